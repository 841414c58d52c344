"""Three small bilevel problems with NONCONVEX lower levels, written as a new user would write them (issue 10).

    a. ``LayerwiseWeightDecay``: per-layer weight decay of a tanh MLP (64 -> 32 -> 32 -> 10) on digits
           lower:  w*(x) = argmin_w  CE(w; train minibatch) + 1/2 sum_l exp(x_l) |W_l|^2
           upper:  min_x  CE(w*(x); validation)
    b. ``NoisyLabelReweighting``: per-example weights of a small CNN with BatchNorm on noisy digits
           lower:  w*(x) = argmin_w  mean_{i in minibatch} sigmoid(x_i) CE(w; a_i, noisy b_i) + mu/2 |w|^2
           upper:  min_x  CE(w*(x); clean validation)
    c. ``ProximalSinusoid``: iMAML (Rajeswaran, Finn, Kakade, Levine 2019) on sinusoid regression tasks
           lower:  phi*(theta) = argmin_phi  1/2 MSE(phi; support of task t) + lam/2 |phi - theta|^2
           upper:  min_theta  1/2 MSE(phi*(theta); query of task t)

None of them has a positive definite lower Hessian everywhere: the networks are nonconvex in their
weights and the ridges (when any) are small. They are sized so that one outer step of
``hypergrad.CG()`` at its defaults costs a few milliseconds to a few tens of milliseconds on one
CPU thread (measured in ``experiments/results/nonconvex.md``). Every problem is seeded (split,
corruption, tasks, initialization, minibatch order) and float32 by default.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from problems.cleaning import N_CLASSES, load_dataset
from problems.common import statistics_kept

__all__ = ["LayerwiseWeightDecay", "NoisyLabelReweighting", "ProximalSinusoid"]


def _digits_split(n_train: int, n_val: int, seed: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Digits inputs [1797, 64] in [0, 1] (float64), labels [1797], and a seeded index split.

    The split holds ``train`` [n_train], ``val`` [n_val] and ``test`` (the rest) index tensors.
    """
    inputs, labels = load_dataset("digits", None)
    n = inputs.shape[0]
    if n_train < 1 or n_val < 1 or n_train + n_val >= n:
        raise ValueError(f"need n_train >= 1, n_val >= 1 and n_train + n_val < {n}, got {n_train} and {n_val}")
    # numpy's RandomState, as problems.cleaning does: its streams are fixed across versions.
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n))
    return inputs.to(torch.float64), labels, {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
                                              "test": perm[n_train + n_val:]}


def _init_uniform(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default bound +-1/sqrt(fan_in) for every weight, biases zero, drawn from ``gen``.

    Drawn explicitly so that the problem is reproducible from its seed whatever the global RNG.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                nn.init.uniform_(layer.weight, -fan_in**-0.5, fan_in**-0.5, generator=gen)
                nn.init.zeros_(layer.bias)


def _loader(tensors: tuple[Tensor, ...], batch_size: int, seed: int) -> DataLoader:
    """A shuffled minibatch DataLoader whose order comes from its own ``torch.Generator`` seeded with ``seed``."""
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


# -- a. per-layer weight decay of a tanh MLP ---------------------------------------------------------------------


class LayerwiseWeightDecay(bilevel.BilevelProblem):
    """Per-layer weight decay (one log-coefficient per Linear layer) of a tanh MLP on scikit-learn's digits.

    Args:
        seed: seeds the split, the MLP's initialization and the minibatch order.
        hidden: widths of the hidden layers (at least two); tanh after each.
        n_train, n_val: training (lower) and validation (upper) examples; the rest of the 1797 are the test set.
        batch_size: lower minibatch size (shuffled, last partial batch dropped).
        init_log_decay: the starting x_l for every layer.
        dtype: of the parameters and data.

    x = ``upper.log_decay`` [n_layers]; y = the MLP's weights and biases (biases not decayed). Upper
    data is the full validation set every step.
    """

    def __init__(self, seed: int = 0, hidden: tuple[int, ...] = (32, 32), n_train: int = 1000, n_val: int = 300,
                 batch_size: int = 100, init_log_decay: float = math.log(1e-3),
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(hidden) < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"LayerwiseWeightDecay: hidden needs >= 2 positive widths, got {hidden!r}")
        if not 1 <= batch_size <= n_train:
            raise ValueError(f"LayerwiseWeightDecay: batch_size must be in [1, n_train={n_train}], got {batch_size}")
        inputs, labels, split = _digits_split(n_train, n_val, seed)
        self.seed, self.batch_size = seed, batch_size
        for part in ("train", "val", "test"):
            self.register_buffer(f"{part}_inputs", inputs[split[part]].to(dtype), persistent=False)
            self.register_buffer(f"{part}_labels", labels[split[part]], persistent=False)
        widths = (inputs.shape[1], *hidden, N_CLASSES)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        self.lower = nn.Sequential(*layers)
        _init_uniform(self.lower, torch.Generator().manual_seed(seed))
        self.lower.to(dtype)
        self.n_layers = len(widths) - 1
        self.upper = bilevel.Hyper(log_decay=torch.full((self.n_layers,), float(init_log_decay), dtype=dtype))

    def _weights(self) -> list[Tensor]:
        return [m.weight for m in self.lower if isinstance(m, nn.Linear)]

    def lower_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """g: minibatch CE + 1/2 sum_l exp(x_l) |W_l|^2; batch = (inputs [B, 64], labels [B])."""
        inputs, labels = batch
        decay = torch.exp(self.upper.log_decay)
        penalty = sum(decay[i] * w.square().sum() for i, w in enumerate(self._weights()))
        return F.cross_entropy(self.lower(inputs), labels) + 0.5 * penalty

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: validation CE; batch = (inputs [V, 64], labels [V])."""
        inputs, labels = batch
        return F.cross_entropy(self.lower(inputs), labels)

    def data(self) -> tuple[DataLoader, tuple[Tensor, Tensor]]:
        """(shuffled train minibatches of (inputs [B, 64], labels [B]), full validation (inputs [V, 64], labels [V])).

        A fresh loader with its generator at ``seed`` on every call, so two runs see the same order.
        """
        lower = _loader((self.train_inputs, self.train_labels), self.batch_size, self.seed)
        return lower, (self.val_inputs, self.val_labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation CE (f on the full validation set), test CE and accuracy, the decay coefficients."""
        val, test = self.lower(self.val_inputs), self.lower(self.test_inputs)
        metrics = {
            "validation_loss": F.cross_entropy(val, self.val_labels).item(),
            "test_loss": F.cross_entropy(test, self.test_labels).item(),
            "test_accuracy": (test.argmax(-1) == self.test_labels).double().mean().item(),
        }
        metrics.update({f"decay_{i}": float(d) for i, d in enumerate(torch.exp(self.upper.log_decay))})
        return metrics


# -- b. per-example reweighting of noisy labels, CNN with BatchNorm ----------------------------------------------


class SmallCNN(nn.Sequential):
    """images [B, 1, 8, 8] -> conv3x3 stride 2 (``channels``) -> BatchNorm -> ReLU -> linear -> logits [B, 10].

    One convolution: on one CPU thread the cost of these tiny layers is per-operation overhead, and a
    second conv block doubled the outer step (measured 46 -> 81-90 ms for CG's defaults on a busy core).
    """

    def __init__(self, channels: int = 8) -> None:
        super().__init__(nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * channels, N_CLASSES))


class NoisyLabelReweighting(bilevel.BilevelProblem):
    """Per-example weights sigmoid(x_i) of noisy digits for a small CNN with BatchNorm (Ren et al. 2018, bilevel form).

    Args:
        seed: seeds the split, which labels are flipped (and to what), the CNN's init and the minibatch order.
        n_train: training examples (lower data), of which ``noise`` are given a different random label.
        noise: fraction of training labels flipped.
        n_val: clean validation examples (upper data, full batch); the rest of the 1797 are the test set.
        batch_size: lower minibatch size (shuffled, last partial batch dropped).
        mu: L2 on the CNN's parameters (a user's usual weight decay; far too small to convexify g).
        channels: output channels of the convolution.
        dtype: of the parameters and data.

    x = ``upper.logits`` [n_train] at 0 (every weight 1/2); y = the CNN's parameters; its BatchNorm
    running statistics are buffers that ``bilevel.fit`` refreshes once per outer step. f and
    ``evaluate()["validation_loss"]`` normalise with the batch's own statistics (training mode),
    so the validation loss is the f the engines minimise; ``test_accuracy`` uses the running ones.
    """

    def __init__(self, seed: int = 0, n_train: int = 1000, noise: float = 0.35, n_val: int = 200,
                 batch_size: int = 32, mu: float = 1e-4, channels: int = 8,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"NoisyLabelReweighting: noise must be in [0, 1), got {noise}")
        if not 1 <= batch_size <= n_train:
            raise ValueError(f"NoisyLabelReweighting: batch_size must be in [1, n_train={n_train}], got {batch_size}")
        inputs, labels, split = _digits_split(n_train, n_val, seed)
        images = inputs.reshape(-1, 1, 8, 8)
        rs = np.random.RandomState(seed + 1)  # a stream of its own: the split stays that of the other problems
        flipped = torch.from_numpy(rs.choice(n_train, int(round(noise * n_train)), replace=False))
        shift = torch.from_numpy(rs.randint(1, N_CLASSES, size=flipped.shape[0])).to(torch.int64)
        noisy = labels[split["train"]].clone()
        noisy[flipped] = (noisy[flipped] + shift) % N_CLASSES  # a shift in 1..9: never the true class
        corrupted = torch.zeros(n_train, dtype=torch.bool)
        corrupted[flipped] = True
        self.seed, self.batch_size, self.mu = seed, batch_size, mu
        for name, value in (("train_images", images[split["train"]].to(dtype)), ("train_labels", noisy),
                            ("true_train_labels", labels[split["train"]]), ("corrupted", corrupted),
                            ("val_images", images[split["val"]].to(dtype)), ("val_labels", labels[split["val"]]),
                            ("test_images", images[split["test"]].to(dtype)), ("test_labels", labels[split["test"]])):
            self.register_buffer(name, value, persistent=False)
        self.lower = SmallCNN(channels)
        _init_uniform(self.lower, torch.Generator().manual_seed(seed))
        self.lower.to(dtype)
        self.upper = bilevel.Hyper(logits=torch.zeros(n_train, dtype=dtype))

    def lower_objective(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """g: mean sigmoid(x_i) CE_i + mu/2 |w|^2; batch = (images [B, 1, 8, 8], noisy labels [B], index [B])."""
        images, labels, index = batch
        weights = torch.sigmoid(self.upper.logits[index])
        losses = F.cross_entropy(self.lower(images), labels, reduction="none")
        ridge = sum(p.square().sum() for p in self.lower.parameters())
        return (weights * losses).mean() + 0.5 * self.mu * ridge

    def upper_objective(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """f: clean validation CE; batch = (images [V, 1, 8, 8], labels [V])."""
        images, labels = batch
        return F.cross_entropy(self.lower(images), labels)

    def data(self) -> tuple[DataLoader, tuple[Tensor, Tensor]]:
        """(shuffled train minibatches (images [B, 1, 8, 8], noisy labels [B], index [B] into train),
        full validation (images [V, 1, 8, 8], labels [V])); a fresh loader seeded at ``seed`` on every call."""
        index = torch.arange(self.train_labels.shape[0], device=self.train_labels.device)
        lower = _loader((self.train_images, self.train_labels, index), self.batch_size, self.seed)
        return lower, (self.val_images, self.val_labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation CE as f sees it (batch statistics), test accuracy (running statistics), weights by corruption."""
        with statistics_kept(self.lower):
            self.lower.train()
            validation = F.cross_entropy(self.lower(self.val_images), self.val_labels).item()
            self.lower.eval()
            test = self.lower(self.test_images)
        weights = torch.sigmoid(self.upper.logits)
        return {
            "validation_loss": validation,
            "test_loss": F.cross_entropy(test, self.test_labels).item(),
            "test_accuracy": (test.argmax(-1) == self.test_labels).double().mean().item(),
            "weight_corrupted": weights[self.corrupted].mean().item(),
            "weight_clean": weights[~self.corrupted].mean().item(),
        }


# -- c. iMAML on sinusoid regression -----------------------------------------------------------------------------

SinusoidBatch = tuple[Tensor, Tensor, Tensor]


def sinusoid_tasks(n_tasks: int, points: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n_tasks`` tasks y = amplitude sin(x - phase) (Finn et al. 2017), float64.

    Amplitude in [0.1, 5], phase in [0, pi], ``points`` inputs uniform in [-5, 5] per task.
    Returns (amplitude [T], phase [T], inputs [T, points, 1]).
    """
    amplitude = 0.1 + 4.9 * torch.rand(n_tasks, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(n_tasks, generator=gen, dtype=torch.float64)
    inputs = 10 * torch.rand(n_tasks, points, 1, generator=gen, dtype=torch.float64) - 5
    return amplitude, phase, inputs


class ProximalSinusoid(bilevel.BilevelProblem):
    """iMAML's proximal lower level on a stream of sinusoid regression tasks.

    Args:
        seed: seeds the tasks, their points and the initialization theta (phi starts at theta).
        n_tasks: meta-training tasks, one per step in a fixed cycle (lower: support, upper: query).
        n_val_tasks: held-out tasks of ``evaluate``.
        support, query: points per task in each set.
        hidden: widths of the MLP 1 -> hidden -> ... -> 1 (tanh).
        lam: the proximal weight lambda.
        adapt_steps, adapt_lr: the adaptation ``evaluate`` runs on a held-out task: gradient descent on
            g from phi = theta (the defaults are the engines' default inner loop).

    The losses are 1/2 MSE (the least-squares convention): with the plain MSE and lam = 2 the lower
    Hessian's largest eigenvalue was 20-28 on seed 0's first task, so gradient descent at the README's
    ``inner_lr=0.1`` was unstable by itself, whatever the hypergradient. With 1/2 MSE, lam = 1 and
    hidden (20, 20) (power iteration on that task): largest 7.6 and smallest -0.85 at the start
    (indefinite), largest 18 after 100 inner steps. At hidden (32, 32) the largest reached 23 > 2 / 0.1
    and even ``Unrolled()`` failed on seed 1 (held-out loss up to 640 mid-run), so the default width is 20.
        dtype: of the parameters and data.

    x = ``upper`` (a copy of the MLP: theta, the meta-initialisation); y = ``lower`` (phi). The two
    data streams are lists of the same tasks in the same order, so the lower batch of step k is the
    support set of the task whose query set is the upper batch of step k. phi is not reset between
    tasks: the engines warm-start y, so each task's adaptation starts where the previous one ended
    (the proximal term pulls it towards theta).
    """

    def __init__(self, seed: int = 0, n_tasks: int = 25, n_val_tasks: int = 16, support: int = 10, query: int = 10,
                 hidden: tuple[int, ...] = (20, 20), lam: float = 1.0, adapt_steps: int = 10, adapt_lr: float = 0.1,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if n_tasks < 1 or n_val_tasks < 1 or support < 1 or query < 1:
            raise ValueError("ProximalSinusoid: n_tasks, n_val_tasks, support and query must be >= 1")
        if lam <= 0:
            raise ValueError(f"ProximalSinusoid: lam must be > 0, got {lam}")
        gen = torch.Generator().manual_seed(seed)
        for name, count in (("train", n_tasks), ("val", n_val_tasks)):
            amplitude, phase, inputs = sinusoid_tasks(count, support + query, gen)
            targets = amplitude[:, None] * torch.sin(inputs[..., 0] - phase[:, None])
            self.register_buffer(f"{name}_amplitude", amplitude.to(dtype), persistent=False)
            for part, cut in (("support", slice(0, support)), ("query", slice(support, None))):
                self.register_buffer(f"{name}_{part}_x", inputs[:, cut].to(dtype), persistent=False)
                self.register_buffer(f"{name}_{part}_y", targets[:, cut].to(dtype), persistent=False)
        self.lam, self.adapt_steps, self.adapt_lr = float(lam), adapt_steps, adapt_lr
        widths = (1, *hidden, 1)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        net = nn.Sequential(*layers)
        _init_uniform(net, gen)
        self.upper = net.to(dtype)
        self.lower = copy.deepcopy(self.upper)

    def _proximal(self) -> Tensor:
        pairs = zip(self.lower.parameters(), self.upper.parameters(), strict=True)
        return sum((p - q).square().sum() for p, q in pairs)

    def lower_objective(self, batch: SinusoidBatch) -> Tensor:
        """g: 1/2 support MSE + lam/2 |phi - theta|^2; batch = (inputs [K, 1], targets [K], task index [1])."""
        inputs, targets, _ = batch
        return 0.5 * F.mse_loss(self.lower(inputs).squeeze(-1), targets) + 0.5 * self.lam * self._proximal()

    def upper_objective(self, batch: SinusoidBatch) -> Tensor:
        """f: 1/2 query MSE; batch = (inputs [Q, 1], targets [Q], task index [1])."""
        inputs, targets, _ = batch
        return 0.5 * F.mse_loss(self.lower(inputs).squeeze(-1), targets)

    def data(self) -> tuple[list[SinusoidBatch], list[SinusoidBatch]]:
        """Two lists of ``n_tasks`` batches, task t at position t in both: support (lower) and query (upper).

        Each batch is (inputs [K or Q, 1], targets [K or Q], task index int64 [1]); the lists have
        equal length, so Lightning's cycling keeps them aligned.
        """
        n = self.train_support_x.shape[0]
        ids = [torch.tensor([t], device=self.train_support_x.device) for t in range(n)]
        lower = [(self.train_support_x[t], self.train_support_y[t], ids[t]) for t in range(n)]
        upper = [(self.train_query_x[t], self.train_query_y[t], ids[t]) for t in range(n)]
        return lower, upper

    def adapt(self, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """phi after ``adapt_steps`` gradient steps on g from phi = theta, for T tasks at once.

        Args:
            inputs: support inputs [T, K, 1]; targets: [T, K].

        Returns phi as a dict of the MLP's parameters, each with a leading task dimension T.
        """
        theta = {k: p.detach() for k, p in self.upper.named_parameters()}

        def g(phi: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
            prediction = torch.func.functional_call(self.upper, phi, (x,)).squeeze(-1)
            proximal = sum((phi[k] - theta[k]).square().sum() for k in theta)
            return 0.5 * F.mse_loss(prediction, t) + 0.5 * self.lam * proximal

        # One vmapped gradient per step for all tasks: a Python loop over tasks cost 16x the calls.
        step = torch.func.vmap(torch.func.grad(g))
        phi = {k: v.expand(inputs.shape[0], *v.shape).clone() for k, v in theta.items()}
        for _ in range(self.adapt_steps):
            grads = step(phi, inputs, targets)
            phi = {k: phi[k] - self.adapt_lr * grads[k] for k in phi}
        return phi

    def evaluate(self) -> dict[str, float]:
        """Mean 1/2 query MSE (f) over the held-out tasks after adaptation from theta (``validation_loss``)
        and before it (``validation_loss_unadapted``)."""
        phi = self.adapt(self.val_support_x, self.val_support_y)
        with torch.no_grad():
            predict = torch.func.vmap(lambda p, x: torch.func.functional_call(self.upper, p, (x,)).squeeze(-1))
            after = 0.5 * F.mse_loss(predict(phi, self.val_query_x), self.val_query_y)
            before = 0.5 * F.mse_loss(self.upper(self.val_query_x).squeeze(-1), self.val_query_y)
        return {"validation_loss": after.item(), "validation_loss_unadapted": before.item()}
