"""Assemble ``experiments/results/speed.md`` from the benchmarks' own result files.

Each benchmark writes ``experiments/results/speed/<name>.md`` (its tables, the environment line and the
command that regenerates it) and its PNGs; this joins them, in the order of the issue, under one page.

    python -m experiments.bench.report
"""

from __future__ import annotations

from experiments.bench.common import RESULTS

PARTS = (
    ("overhead", "Overhead over the same mathematics by hand"),
    ("kernels", "Kernel cost"),
    ("population", "Populations with vmap"),
    ("compile", "torch.compile"),
    ("compile_k", "torch.compile against the number of iterations, next to JAXopt"),
    ("compile_floor", "Compile time: the floor on this machine, and a warm cache"),
    ("memory", "Unrolled vs implicit memory"),
    ("unrolled", "Unrolled against TorchOpt and higher"),
    ("fit_loop", "bilevel.fit against a plain loop"),
    ("peers", "Peers side by side"),
)


def main() -> None:
    out = ["# Speed and memory", "",
           "Every section below is the output of one benchmark under `experiments/bench/`, copied from",
           "`experiments/results/speed/<name>.md`; the command that regenerates it is in the section. Ratios are",
           "measured side by side in one run (interleaved repetitions, medians after warm-up). This page is",
           "assembled by `python -m experiments.bench.report`.", ""]
    for name, title in PARTS:
        path = RESULTS / "speed" / f"{name}.md"
        out += [f"## {title}", ""]
        if not path.exists():
            out += [f"(not run yet: `python -m experiments.bench.{name} --device cpu`)", ""]
            continue
        body = path.read_text().strip().splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]  # the section title above replaces the file's own
        # Figures live beside the part files; links in the assembled page are relative to results/.
        out += [line.replace("](", "](speed/") if "![" in line and "](speed/" not in line else line
                for line in body] + [""]
        # The plots a part writes but does not show itself.
        text = "\n".join(body)
        out += [f"![{png.stem}](speed/{png.name})" for png in sorted(path.parent.glob(f"{name}*.png"))
                if f"]({png.name})" not in text] + [""]
    (RESULTS / "speed.md").write_text("\n".join(out))
    print(f"wrote {RESULTS / 'speed.md'}")


if __name__ == "__main__":
    main()
