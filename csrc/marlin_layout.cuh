// Where the Marlin format (gptq/format.py) puts things, as device helpers shared by the kernels.
#pragma once

namespace marlin {

// Position in the scale layout of column c of a 64-column strip: grouped scales hold column 8j + i at
// position 8i + j of each 64; per-channel scales hold column 2i + d (d in 0,1,8,9,16,17,24,25) at position
// 8i + (index of d) of each 32.
__device__ __forceinline__ int scale_pos(int c, bool per_channel) {
  if (!per_channel) return 8 * (c % 8) + c / 8;
  const int c32 = c % 32, i = (c32 % 8) / 2, d = c32 - 2 * i;  // c32 = 2i + d, d in (0,1,8,9,16,17,24,25)
  return c - c32 + 8 * i + 2 * (d / 8) + d % 8;
}

}  // namespace marlin
