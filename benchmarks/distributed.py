"""Muon / Kron optimizer steps under FSDP2 on gloo ranks: bytes sent and step time vs one process.

Set: step.py's transformer set (16 x 512x512, 4 x 2048x512, 4 x 512x2048 matrices,
40 vectors of 512), dims divided by ``--shrink`` for small machines.  One module holds
them all, ``fully_shard`` shards every one on dim 0 over W gloo ranks; each rank gets
fixed gradients (DTensor shards of the same full gradients) and times ``opt.step()``
alone (forward/backward and FSDP's own collectives are not the optimizer's).  A barrier
after each step makes a rank's time the slowest rank's.

Columns
  bytes/step/rank  what one rank puts on the wire in the optimizer's two all_to_all_single
                   calls (counted from the sizes it sends, self-sends excluded;
                   ``adapters/torch/distributed.bytes_sent``); times W is the total.
  param bytes      the full size of all parameters, for scale: the owner pattern sends
                   2 (W-1)/W of the matrices' (Muon) or all params' (Kron) bytes per step
                   in total, so about 2/W of it per rank.
  step ms          median over repeats, rank 0 after the barrier.
  vs 1 process     step time over the same optimizer on plain tensors in one process
                   (1 torch thread per process in both, so a rank computes on one core).

DDP needs no table: its ranks run the single-process step on replicated tensors and the
optimizer sends nothing.

    python benchmarks/distributed.py [--worlds 2,4] [--shrink 1] [--repeats 5] [--opts muon,kron]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_time, table  # noqa: E402


def shapes(shrink: int):
    d, h = 512 // shrink, 2048 // shrink
    return [(d, d)] * 16 + [(h, d)] * 4 + [(d, h)] * 4 + [(d,)] * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(kind, shp):
    import torch

    from xpopt.adapters.torch import Kron, Muon

    g = torch.Generator().manual_seed(0)
    mod = torch.nn.Module()
    mod.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shp])
    grads = [torch.randn(*s, generator=g) for s in shp]
    make = (lambda ps: Muon(ps, lr=0.02)) if kind == "muon" else (lambda ps: Kron(ps, lr=1e-3, dtype=torch.float32))
    return mod, grads, make


def _single(kind, shp, repeats):
    import torch

    torch.set_num_threads(1)
    mod, grads, make = _build(kind, shp)
    for p, gr in zip(mod.parameters(), grads):
        p.grad = gr
    opt = make(list(mod.parameters()))
    return median_time(opt.step, repeats=repeats, warmup=1)


def _worker(rank, world, port, kind, shp, repeats, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from xpopt.adapters.torch import distributed as torch_dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    mesh = init_device_mesh("cpu", (world,))
    mod, grads, make = _build(kind, shp)
    fully_shard(mod, mesh=mesh)
    for p, gr in zip(mod.parameters(), grads):
        p.grad = distribute_tensor(gr, mesh, [Shard(0)])
    opt = make(list(mod.parameters()))

    def step():
        opt.step()
        dist.barrier()

    step()  # state creation
    torch_dist.reset_bytes()
    step()
    sent = torch_dist.bytes_sent()
    t = median_time(step, repeats=repeats, warmup=1)
    if rank == 0:
        import json

        with open(out, "w") as f:
            json.dump({"bytes": sent, "ms": t * 1e3}, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--opts", default="muon,kron")
    a = ap.parse_args()
    import json

    import torch.multiprocessing as mp

    shp = shapes(a.shrink)
    param_bytes = sum(4 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in shp)
    rows = []
    for kind in a.opts.split(","):
        base = _single(kind, shp, a.repeats) * 1e3
        rows.append({"optimizer": kind, "ranks": 1, "bytes/step/rank": 0, "param bytes": param_bytes,
                     "step ms": f"{base:.1f}", "vs 1 process": "1 (base)"})
        for w in (int(x) for x in a.worlds.split(",")):
            out = os.path.join(tempfile.mkdtemp(), "r.json")
            mp.start_processes(_worker, args=(w, _free_port(), kind, shp, a.repeats, out), nprocs=w,
                               start_method="spawn")
            r = json.load(open(out))
            rows.append({"optimizer": kind, "ranks": w, "bytes/step/rank": r["bytes"], "param bytes": param_bytes,
                         "step ms": f"{r['ms']:.1f}", "vs 1 process": f"{r['ms'] / base:.2f}"})
    print(f"# {machine()}; set: transformer / {a.shrink} (FSDP2, gloo, 1 thread per rank)")
    print(table(rows, ["optimizer", "ranks", "bytes/step/rank", "param bytes", "step ms", "vs 1 process"]))


if __name__ == "__main__":
    main()
