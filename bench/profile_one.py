"""Three et_int4_plain_mm calls on fresh random data, for Nsight Compute (K N group_size M [zeros],
zeros "group", the default, "row": one zero point per row, all 8, or "symmetric": torchao's default as
the pass stores it):

    ncu --kernel-name regex:w4a8_gemm --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python3 bench/profile_one.py 21504 5376 32 8 row
"""

import sys

import et_int4  # noqa: F401  (registers the op)
import torch
from et_int4.backends.cuda.int4.packing import symmetric_zero, tile_weights


def random_weights(k: int, n: int, group_size: int, zeros: str, gen: torch.Generator):
    """Random tiled weights: qdata, scale and zero as the pass stores them."""
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    scale = torch.rand(n, k // group_size, device="cuda", generator=gen).bfloat16()
    zero = (torch.randint(0, 16, (n, k // group_size), dtype=torch.int8, device="cuda", generator=gen)
            if zeros == "group" else torch.full((n, 1), 8, dtype=torch.int8, device="cuda"))
    qdata, scale, zero = tile_weights(qdata, scale, zero)
    return qdata, scale, symmetric_zero(n, "cuda") if zeros == "symmetric" else zero


if __name__ == "__main__":
    k, n, group_size, m = map(int, sys.argv[1:5])
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    qdata, scale, zero = random_weights(k, n, group_size, sys.argv[5] if len(sys.argv) > 5 else "group", gen)
    for _ in range(3):
        torch.ops.et_int4.et_int4_plain_mm(x, qdata, scale, zero, group_size, 8)
    torch.cuda.synchronize()
