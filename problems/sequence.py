"""Hyper-representation with a recurrent encoder: the BO-REP setting (Hao, Gong, Liu, ICLR 2024).

    lower:  y*(x) = argmin_y  mean_i CE(y; phi_x(s_i), l_i) + ridge/2 |y|^2    (train split)
    upper:  F(x)  = mean_j CE(y*(x); phi_x(s_j), l_j)                          (validation split)

x are the parameters of a GRU encoder phi_x (its last hidden state, shape [hidden]); y = (W, b)
is a linear softmax head on top of it. The lower level is strongly convex in y (convex CE plus a
ridge), the upper level is an RNN, whose smoothness grows with its gradient: the "unbounded
smoothness" BO-REP is built for.

The task, generated from ``seed``: "remember the first key". A sequence of ``seq_len`` tokens
holds distractor tokens, one key token (one of ``n_classes``) at a random position in its first
half, and, in ``late_key_prob`` of the sequences, a second, different key token in its second
half. The label is the first key. Tokens are one-hot vectors plus Gaussian noise of std
``noise``. The defaults leave a head fitted on the random initial encoder at chance (test accuracy
0.25-0.28, ``baseline_random_encoder_accuracy``): by the sequence's end the first key is washed out
and the decoy only misleads. An encoder trained through the upper level learns to keep it (0.95 after
100 CG steps, experiments/configs/sequence_gru.yaml).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from problems.common import lbfgs

Batch = tuple[Tensor, Tensor]


def first_key_task(n: int, seq_len: int, n_classes: int, n_distractors: int, late_key_prob: float, noise: float,
                   generator: torch.Generator) -> Batch:
    """``n`` sequences of the "remember the first key" task.

    Returns (inputs [n, seq_len, n_classes + n_distractors] default dtype, labels int64 [n]).
    Tokens 0..n_classes-1 are keys, the rest distractors.
    """
    half = seq_len // 2
    tokens = n_classes + torch.randint(n_distractors, (n, seq_len), generator=generator)
    labels = torch.randint(n_classes, (n,), generator=generator)
    rows = torch.arange(n)
    tokens[rows, torch.randint(half, (n,), generator=generator)] = labels
    # The decoy differs from the label (a shift in 1..K-1 mod K), so copying it is always wrong.
    decoy = (labels + torch.randint(1, n_classes, (n,), generator=generator)) % n_classes
    late = torch.rand(n, generator=generator) < late_key_prob
    late_pos = half + torch.randint(seq_len - half, (n,), generator=generator)
    tokens[rows[late], late_pos[late]] = decoy[late]
    inputs = F.one_hot(tokens, n_classes + n_distractors).to(torch.get_default_dtype())
    inputs = inputs + noise * torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype)
    return inputs, labels


class GRUEncoder(nn.Module):
    """A one-layer GRU (torch.nn.GRU's equations and init) written with plain tensor ops.

    Plain ops rather than the fused ``nn.GRU`` kernel so every torch.func transform (forward-mode
    HVPs, vmap over a population) applies. ``forward`` maps inputs [B, T, d] to the last hidden
    state [B, hidden].
    """

    def __init__(self, input_size: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((2 * torch.rand(shape, generator=generator) - 1) * bound)

        # Rows are the (reset, update, new) gates, as in nn.GRU.
        self.weight_ih = uniform(3 * hidden, input_size)
        self.weight_hh = uniform(3 * hidden, hidden)
        self.bias_ih = uniform(3 * hidden)
        self.bias_hh = uniform(3 * hidden)
        self.hidden = hidden

    def forward(self, inputs: Tensor) -> Tensor:
        two = 2 * self.hidden
        gates_in = inputs @ self.weight_ih.T + self.bias_ih  # [B, T, 3H], every step's input part at once
        weight_hh_t = self.weight_hh.T
        h = inputs.new_zeros(inputs.shape[0], self.hidden)
        # Few ops per step (the cost of a small RNN is per-op overhead): r and z share one sigmoid,
        # and lerp gives (1 - z) n + z h in one op.
        for t in range(inputs.shape[1]):
            gates_h = torch.addmm(self.bias_hh, h, weight_hh_t)
            step_in = gates_in[:, t]
            r, z = torch.sigmoid(step_in[:, :two] + gates_h[:, :two]).chunk(2, dim=-1)
            h = torch.lerp(torch.tanh(step_in[:, two:] + r * gates_h[:, two:]), h, z)
        return h


class SequenceHyperRep(bilevel.BilevelProblem):
    """A GRU encoder (upper) under a ridge-regularized linear softmax head (lower).

    Args:
        seed: seeds the data and the encoder's initialization (the head starts at zero).
        n_train, n_val, n_test: sequences in the lower (train), upper (validation) and test splits.
        seq_len: tokens per sequence.
        hidden: GRU hidden size (the representation's dimension).
        n_classes: key tokens, which are also the classes.
        n_distractors: distractor tokens.
        late_key_prob: fraction of sequences with a decoy key in their second half.
        noise: std of the Gaussian noise added to the one-hot tokens.
        ridge: L2 penalty on the head (weight and bias); makes the lower level strongly convex.
        batch_size: None (default) serves full batches; an int serves shuffled minibatches of
            that size for both levels (seeded), for stochastic engines.

    Data lives in non-persistent buffers: ``.double()`` converts it, checkpoints stay small.
    """

    def __init__(self, seed: int = 0, n_train: int = 256, n_val: int = 128, n_test: int = 1024, seq_len: int = 16,
                 hidden: int = 16, n_classes: int = 4, n_distractors: int = 4, late_key_prob: float = 0.5,
                 noise: float = 0.1, ridge: float = 1e-2, batch_size: int | None = None) -> None:
        super().__init__()
        name = "SequenceHyperRep"
        for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("seq_len", seq_len),
                           ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name}: {arg} must be >= 1, got {value}")
        if seq_len < 2 or n_classes < 2 or n_distractors < 1:
            raise ValueError(f"{name}: need seq_len >= 2, n_classes >= 2, n_distractors >= 1, got {seq_len}, "
                             f"{n_classes}, {n_distractors}")
        if not 0 <= late_key_prob <= 1 or noise < 0 or ridge <= 0:
            raise ValueError(f"{name}: need 0 <= late_key_prob <= 1, noise >= 0, ridge > 0, got {late_key_prob}, "
                             f"{noise}, {ridge}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"{name}: batch_size must be None (full batches) or >= 1, got {batch_size}")
        self.seed, self.ridge, self.batch_size, self.n_classes = seed, ridge, batch_size, n_classes
        generator = torch.Generator().manual_seed(seed)
        task = (seq_len, n_classes, n_distractors, late_key_prob, noise, generator)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            inputs, labels = first_key_task(n, *task)
            self.register_buffer(f"{split}_inputs", inputs, persistent=False)
            self.register_buffer(f"{split}_labels", labels, persistent=False)
        self.upper = GRUEncoder(n_classes + n_distractors, hidden, generator)
        # A plain copy (not buffers): kept out of checkpoints and of .double(), read by baselines().
        self._initial_encoder = {k: v.detach().clone() for k, v in self.upper.state_dict().items()}
        self.lower = nn.Linear(hidden, n_classes)
        nn.init.zeros_(self.lower.weight)  # strongly convex lower level: any start works, zeros is reproducible
        nn.init.zeros_(self.lower.bias)
        self._baselines: dict[str, float] | None = None

    def _ridge(self) -> Tensor:
        return self.lower.weight.square().sum() + self.lower.bias.square().sum()

    def lower_objective(self, batch: Batch) -> Tensor:
        """g: train CE of the head on the encoder's features + ridge/2 |y|^2; batch = (inputs [B, T, d], labels [B])."""
        inputs, labels = batch
        return F.cross_entropy(self.lower(self.upper(inputs)), labels) + self.ridge / 2 * self._ridge()

    def upper_objective(self, batch: Batch) -> Tensor:
        """f: validation CE of the head on the encoder's features; batch = (inputs [B, T, d], labels [B])."""
        inputs, labels = batch
        return F.cross_entropy(self.lower(self.upper(inputs)), labels)

    def data(self) -> tuple[Batch | DataLoader, Batch | DataLoader]:
        """(lower data, upper data): full batches (train, val), or seeded shuffled DataLoaders of ``batch_size``."""
        train, val = (self.train_inputs, self.train_labels), (self.val_inputs, self.val_labels)
        if self.batch_size is None:
            return train, val
        loaders = []
        for offset, split in enumerate((train, val)):
            shuffle = torch.Generator().manual_seed(self.seed * 2 + offset)
            loaders.append(DataLoader(TensorDataset(*split), batch_size=self.batch_size, shuffle=True,
                                      generator=shuffle, drop_last=len(split[1]) > self.batch_size))
        return loaders[0], loaders[1]

    @torch.no_grad()
    def accuracy(self, split: str) -> float:
        """Accuracy of the current encoder and head on ``split`` ("train", "val" or "test")."""
        inputs, labels = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_labels")
        return (self.lower(self.upper(inputs)).argmax(-1) == labels).double().mean().item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test, validation and train accuracy, the upper objective, and the frozen-random-encoder baseline."""
        return {
            "test_accuracy": self.accuracy("test"),
            "val_accuracy": self.accuracy("val"),
            "train_accuracy": self.accuracy("train"),
            "upper_objective": self.upper_objective((self.val_inputs, self.val_labels)).item(),
            **self.baselines(),
        }

    def baselines(self) -> dict[str, float]:
        """Test accuracy of the head solved exactly on the *initial* (random, untrained) encoder (cached).

        The head is fitted by L-BFGS in float64 on the encoder's parameters as ``__init__`` drew them.
        """
        if self._baselines is None:
            f64 = torch.float64
            encoder = GRUEncoder(self.train_inputs.shape[2], self.upper.hidden, torch.Generator()).to(f64)
            encoder.load_state_dict(self._initial_encoder)
            with torch.no_grad():
                train = encoder(self.train_inputs.to(f64))
                test = encoder(self.test_inputs.to(f64))
            head = nn.Linear(train.shape[1], self.n_classes, dtype=f64)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

            def objective() -> Tensor:
                penalty = head.weight.square().sum() + head.bias.square().sum()
                return F.cross_entropy(head(train), self.train_labels) + self.ridge / 2 * penalty

            lbfgs(head.parameters(), objective, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                  history_size=100)  # torch's default
            acc = (head(test).argmax(-1) == self.test_labels).double().mean().item()
            self._baselines = {"baseline_random_encoder_accuracy": acc}
        return dict(self._baselines)
