"""``torch.compile`` of ``xpopt.adapters.torch.Muon.step``: compile time and step time vs eager.

Models (float32, params with fixed random gradients; no forward/backward timed)
  small:   MLP 256 -> 4 x Linear(256, 256) -> 10, LayerNorms        (~0.33 M params)
  medium:  4 transformer blocks, d=256, MLP 1024, vocab 1024, embedding and
           head on the AdamW fallback                                (~3.7 M params)

Rows
  eager            opt.step()
  compiled         torch.compile(opt.step, fullgraph=True), --backend (default inductor):
                   "compile_s" is the first call (trace + compile + run), "compiled_ms"
                   the median of later calls.  Eager and compiled steps alternate, so a
                   varying machine load hits both alike.  The lr is a tensor driven by a
                   LambdaLR; the recompile count after all timed steps is reported (0
                   expected).

    python benchmarks/torch_compile.py [--models small,medium] [--repeats 10] [--backend inductor]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, table  # noqa: E402


def small_model():
    import torch

    layers = [torch.nn.Linear(256, 256)]
    for _ in range(4):
        layers += [torch.nn.LayerNorm(256), torch.nn.Linear(256, 256), torch.nn.GELU()]
    layers.append(torch.nn.Linear(256, 10))
    return torch.nn.Sequential(*layers)


def medium_model():
    import torch

    class Block(torch.nn.Module):
        def __init__(self, d=256):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    class Net(torch.nn.Module):
        def __init__(self, d=256, vocab=1024, depth=4):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.blocks = torch.nn.ModuleList(Block(d) for _ in range(depth))
            self.ln = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, vocab, bias=False)

    return Net()


MODELS = {"small": small_model, "medium": medium_model}


def build(name, seed=0):
    import torch

    from xpopt.adapters.torch import Muon

    torch.manual_seed(seed)
    model = MODELS[name]()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = Muon(model.named_parameters(), lr=torch.tensor(0.02), weight_decay=0.01,
               fallback_filter=lambda n, p: n.startswith(("embed", "head")))
    return model, opt


def bench(name, repeats, backend):
    """Eager and compiled optimizers side by side; timed steps alternate (fair under a varying load)."""
    import statistics

    import torch
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    model, eager_opt = build(name)
    _, opt = build(name)
    n_params = sum(p.numel() for p in model.parameters())
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=counting)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.01 * s)) for o in (eager_opt, opt)]
    t0 = time.perf_counter()
    compiled_step()
    first = time.perf_counter() - t0

    def timed(step, sched):
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the scheduler never sees its wrapper called
            sched.step()
        return dt

    for _ in range(2):  # warm-up
        timed(eager_opt.step, scheds[0])
        timed(compiled_step, scheds[1])
    te, tc = [], []
    for _ in range(repeats):
        te.append(timed(eager_opt.step, scheds[0]))
        tc.append(timed(compiled_step, scheds[1]))
    eager, compiled = statistics.median(te), statistics.median(tc)
    return dict(model=name, params=f"{n_params / 1e6:.2f} M", eager_ms=f"{eager * 1e3:.2f}",
                compile_s=f"{first:.1f}", compiled_ms=f"{compiled * 1e3:.2f}",
                speedup=f"{eager / compiled:.2f}", recompiles=len(graphs) - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,medium")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(m, args.repeats, args.backend) for m in args.models.split(",")]
    print(f"Muon step, float32, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"backend={args.backend} -- {machine()}\n")
    print(table(rows, ["model", "params", "eager_ms", "compile_s", "compiled_ms", "speedup", "recompiles"]))


if __name__ == "__main__":
    main()
