"""What a SwiGLU MLP keeps for its backward on CPU: peak RSS of one forward + backward above the RSS before it.

Usage: python benchmarks/mlp_kept_memory.py [--tokens 2048] [--hidden 128] [--ffn 704 2816] [--layers 1 2 4]

Each (ffn, layers) runs in its own process, one thread.  The model is ``layers`` residual MLP blocks
``x + down(silu(gate(x)) * up(x))`` in float32, as ``models/decoder.py MLP`` computes them; the planner's MLP term
(``planner/memory.py layer_activations``) counts 4 kept (S, F) float32 buffers per layer (gate, silu, up, their
product), i.e. ``tokens * ffn * 16`` bytes.  Printed: measured MiB, the planner's 4-buffer MiB, per layer slope.
Units: MiB (2^20 bytes).  Peak = VmHWM after ``/proc/self/clear_refs`` 5, minus VmRSS before the step (a 64-token
warm-up step builds the kernels first).
"""
import argparse
import os
import subprocess
import sys


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def one(tokens: int, hidden: int, ffn: int, layers: int) -> float:
    import numpy as np
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    rng = np.random.default_rng(0)

    def weight(*shape):
        return Tensor((rng.standard_normal(shape) * 0.02).astype(np.float32))

    class Blocks(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ParameterTuple([Parameter(weight(*shape), name=f"{n}{i}") for i in range(layers)
                                     for n, shape in (("g", (hidden, ffn)), ("u", (hidden, ffn)), ("d", (ffn, hidden)))])

        def construct(self, x):
            for i in range(layers):
                g, u, d = self.w[3 * i], self.w[3 * i + 1], self.w[3 * i + 2]
                x = x + ops.matmul(ops.silu(ops.matmul(x, g)) * ops.matmul(x, u), d)
            return (x * x).sum()

    model = Blocks()
    step = ms.value_and_grad(model, None, model.w)
    step(Tensor(rng.standard_normal((64, hidden)).astype(np.float32)))         # kernels built, pool started
    x = Tensor(rng.standard_normal((tokens, hidden)).astype(np.float32))
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(x)
    return _status("VmHWM") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, nargs="+", default=[704, 2816])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--one", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(f"{one(*args.one):.1f}")
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("| FFN | layers | measured MiB | plan's 4 buffers MiB |")
    print("|---|---|---|---|")
    for ffn in args.ffn:
        for layers in args.layers:
            out = subprocess.run([sys.executable, __file__, "--one", str(args.tokens), str(args.hidden), str(ffn),
                                  str(layers)], capture_output=True, text=True, env=env, check=True)
            planned = args.tokens * ffn * 16 * layers / 2 ** 20
            print(f"| {ffn} | {layers} | {out.stdout.strip().splitlines()[-1]} | {planned:.1f} |")


if __name__ == "__main__":
    main()
