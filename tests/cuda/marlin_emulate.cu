// Host emulation of the Marlin GEMM kernels (kernels/cuda/marlin_gemm.cu), run by tests/test_cuda_marlin.py on a
// machine without a GPU. It drives the same host+device helpers the kernels call (kernels/cuda/marlin_layout.cuh)
// with the kernels' block/warp/lane decomposition, and emulates the two warp-collective steps:
//   - CUDA-core kernel: the lane shuffles and the shared-memory sum over warps become plain sums;
//   - tensor-core kernel: mma.m16n8k16 is computed from the 32 lanes' registers using the fragment tables as the
//     PTX ISA states them (element-indexed, written independently of the helpers' register-indexed formulas),
//     and the B operand goes through the fp16/bf16 "magic number" dequantization bit for bit.
// What it cannot check: the device-only code paths (__ldg, __hsub2, the inline mma asm, shuffles, launch bounds).
//
// Usage: marlin_emulate simt|mma f16|bf16 M N K GROUP COUNT SPLITS MT qweight.bin scales.bin x.bin y.bin
//   qweight int32 [COUNT, K/16, 2N], scales fp16 [COUNT, K/GROUP, N], x raw fp16/bf16 bits [M, COUNT, K];
//   writes y float32 [M, COUNT, N] (the fp32 sums, before rounding to the activation type).
//   MT: rows per block of the CUDA-core kernel (1, 2, 4, 8); the tensor-core kernel uses m16 tiles.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "marlin_layout.cuh"

namespace {

using ktpack::marlin::kChunkN;
using ktpack::marlin::kChunkWords;
using ktpack::marlin::kRowK;

struct Problem {
  int m, n, k, group, count, splits;
  std::vector<uint32_t> qweight;
  std::vector<__half> scales;
  std::vector<uint16_t> x;  // raw activation bits
  std::vector<float> y;
};

template <typename V>
std::vector<V> read_file(const char* path, size_t count) {
  std::vector<V> v(count);
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr || std::fread(v.data(), sizeof(V), count, f) != count) {
    std::fprintf(stderr, "marlin_emulate: cannot read %zu items from %s\n", count, path);
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

constexpr int kSimtWarps = 4;  // as marlin_gemm.cu

template <typename T, int MT>
void run_simt(Problem& p) {
  const T* x = reinterpret_cast<const T*>(p.x.data());
  const int64_t x_stride_m = static_cast<int64_t>(p.count) * p.k;
  const int64_t qw_stride = static_cast<int64_t>(p.k / kRowK) * 2 * p.n;
  const int64_t sc_stride = static_cast<int64_t>(p.k / p.group) * p.n;
  for (int b = 0; b < p.count; ++b) {
    for (int chunk = 0; chunk < p.n / kChunkN; ++chunk) {
      for (int m0 = 0; m0 < p.m; m0 += MT) {
        const int m_valid = p.m - m0 < MT ? p.m - m0 : MT;
        for (int split = 0; split < p.splits; ++split) {
          int s_lo, s_hi;
          ktpack::marlin::split_range(p.k / kRowK, p.splits, split, &s_lo, &s_hi);
          for (int warp = 0; warp < kSimtWarps; ++warp) {
            int r_lo, r_hi;
            ktpack::marlin::split_range(s_hi - s_lo, kSimtWarps, warp, &r_lo, &r_hi);
            for (int lane = 0; lane < 32; ++lane) {
              float acc[MT][8] = {};
              ktpack::marlin::simt_lane_rows<T, MT>(p.qweight.data() + b * qw_stride, p.scales.data() + b * sc_stride,
                                                    x + b * p.k + m0 * x_stride_m, x_stride_m, m_valid, p.n, p.group,
                                                    p.group == p.k, chunk, lane, s_lo + r_lo, s_lo + r_hi, acc);
              for (int m = 0; m < m_valid; ++m) {
                for (int s = 0; s < 8; ++s) {
                  const int col = chunk * kChunkN + ktpack::marlin::chunk_col(s >> 1, s & 1, lane >> 2);
                  p.y[(static_cast<int64_t>(m0 + m) * p.count + b) * p.n + col] += acc[m][s];
                }
              }
            }
          }
        }
      }
    }
  }
}

// PTX ISA fragment tables for mma.m16n8k16 (.f16/.bf16 A and B, .f32 C), element-indexed as in the manual.
// groupID = lane >> 2, threadID_in_group = lane % 4.
void ptx_a(int lane, int e, int* row, int* col) {  // e = 0..7: a0..a7; register e / 2, half e % 2
  const int gid = lane >> 2, tig = lane % 4;
  *row = (e == 0 || e == 1 || e == 4 || e == 5) ? gid : gid + 8;
  *col = e < 4 ? tig * 2 + (e & 1) : tig * 2 + (e & 1) + 8;
}
void ptx_b(int lane, int e, int* row, int* col) {  // e = 0..3: b0..b3; register e / 2, half e % 2
  const int gid = lane >> 2, tig = lane % 4;
  *row = e < 2 ? tig * 2 + (e & 1) : tig * 2 + (e & 1) + 8;
  *col = gid;
}
void ptx_c(int lane, int e, int* row, int* col) {  // e = 0..3: c0..c3
  const int gid = lane >> 2, tig = lane % 4;
  *row = e < 2 ? gid : gid + 8;
  *col = tig * 2 + (e & 1);
}

template <typename T>
float bits_to_float(uint16_t bits);
template <>
float bits_to_float<__half>(uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}
template <>
float bits_to_float<__nv_bfloat16>(uint16_t bits) {
  __nv_bfloat16_raw r;
  r.x = bits;
  return __bfloat162float(__nv_bfloat16(r));
}

// The kernels' dequant_pair, computed on the host from the same constants: halves of (bits | magic) minus the
// halves of the bias constant. Both steps are exact (checked: the result must be an integer in -8..7).
template <typename T>
void dequant_pair(uint32_t bits, float out[2]) {
  const bool f16 = std::is_same<T, __half>::value;
  const uint32_t magic = f16 ? ktpack::marlin::kF16Magic : ktpack::marlin::kBF16Magic;
  const uint32_t bias = f16 ? ktpack::marlin::kF16MagicBias : ktpack::marlin::kBF16MagicBias;
  const uint32_t v = bits | magic;
  for (int i = 0; i < 2; ++i) {
    const float value = bits_to_float<T>(static_cast<uint16_t>(v >> (16 * i)));
    out[i] = value - bits_to_float<T>(static_cast<uint16_t>(bias >> (16 * i)));
    if (out[i] < -8.f || out[i] > 7.f || out[i] != static_cast<float>(static_cast<int>(out[i]))) {
      std::fprintf(stderr, "marlin_emulate: magic dequantization gave %g\n", out[i]);
      std::exit(3);
    }
  }
}

template <typename T>
void run_mma(Problem& p) {
  const T* x = reinterpret_cast<const T*>(p.x.data());
  const int64_t x_stride_m = static_cast<int64_t>(p.count) * p.k;
  const bool single = p.group == p.k;
  const int rows_per_group = p.group / kRowK;
  for (int b = 0; b < p.count; ++b) {
    const uint32_t* qw = p.qweight.data() + b * static_cast<int64_t>(p.k / kRowK) * 2 * p.n;
    const __half* sc = p.scales.data() + b * static_cast<int64_t>(p.k / p.group) * p.n;
    const T* xb = x + b * p.k;
    for (int chunk = 0; chunk < p.n / kChunkN; ++chunk) {
      for (int m0 = 0; m0 < p.m; m0 += 16) {
        for (int split = 0; split < p.splits; ++split) {
          int r_lo, r_hi;
          ktpack::marlin::split_range(p.k / kRowK, p.splits, split, &r_lo, &r_hi);
          float acc[32][8][4] = {}, gacc[32][8][4] = {};
          int cur = r_lo / rows_per_group;
          for (int r = r_lo; r <= r_hi; ++r) {
            const int gi = r / rows_per_group;
            if (r == r_hi || gi != cur) {
              if (r > r_lo) {
                for (int lane = 0; lane < 32; ++lane) {
                  for (int s = 0; s < 8; ++s) {
                    const int col = chunk * kChunkN + ktpack::marlin::chunk_col(s >> 1, s & 1, 0) + 2 * (lane & 3);
                    const __half* srow = sc + static_cast<int64_t>(cur) * p.n;
                    const float s0 = __half2float(srow[ktpack::marlin::scale_col(col, single)]);
                    const float s1 = __half2float(srow[ktpack::marlin::scale_col(col + 1, single)]);
                    for (int i = 0; i < 4; ++i) {
                      acc[lane][s][i] += ((i & 1) ? s1 : s0) * gacc[lane][s][i];
                      gacc[lane][s][i] = 0.f;
                    }
                  }
                }
              }
              cur = gi;
              if (r == r_hi) break;
            }
            // Registers of every lane, as the kernel builds them.
            uint32_t a[32][4];
            uint32_t w[32][4];
            for (int lane = 0; lane < 32; ++lane) {
              ktpack::marlin::load_words(qw + static_cast<int64_t>(r) * 2 * p.n + chunk * kChunkWords + lane * 4,
                                         w[lane]);
              for (int i = 0; i < 4; ++i) {
                const int row = m0 + ktpack::marlin::a_frag_row(lane, i);
                const int col = r * kRowK + ktpack::marlin::a_frag_col(lane, i);
                uint32_t v = 0;
                if (row < p.m) std::memcpy(&v, xb + row * x_stride_m + col, 4);
                a[lane][i] = v;
              }
            }
            // A tile from the registers through the PTX table.
            float A[16][16];
            for (int lane = 0; lane < 32; ++lane) {
              for (int e = 0; e < 8; ++e) {
                int row, col;
                ptx_a(lane, e, &row, &col);
                A[row][col] = bits_to_float<T>(static_cast<uint16_t>(a[lane][e / 2] >> (16 * (e % 2))));
              }
            }
            for (int j = 0; j < 4; ++j) {
              for (int h = 0; h < 2; ++h) {
                float B[16][8];
                for (int lane = 0; lane < 32; ++lane) {
                  for (int f = 0; f < 2; ++f) {
                    float v[2];
                    dequant_pair<T>(ktpack::marlin::b_frag_bits(w[lane][j], h, f), v);
                    for (int half = 0; half < 2; ++half) {
                      int row, col;
                      ptx_b(lane, 2 * f + half, &row, &col);
                      B[row][col] = v[half];
                    }
                  }
                }
                for (int lane = 0; lane < 32; ++lane) {
                  for (int e = 0; e < 4; ++e) {
                    int row, col;
                    ptx_c(lane, e, &row, &col);
                    float d = gacc[lane][2 * j + h][e];
                    for (int kk = 0; kk < 16; ++kk) d += A[row][kk] * B[kk][col];
                    gacc[lane][2 * j + h][e] = d;
                  }
                }
              }
            }
          }
          for (int lane = 0; lane < 32; ++lane) {
            for (int s = 0; s < 8; ++s) {
              for (int i = 0; i < 4; ++i) {
                const int row = m0 + ktpack::marlin::c_frag_row(lane, i);
                const int col =
                    chunk * kChunkN + ktpack::marlin::chunk_col(s >> 1, s & 1, 0) + ktpack::marlin::c_frag_col(lane, i);
                if (row < p.m) p.y[(static_cast<int64_t>(row) * p.count + b) * p.n + col] += acc[lane][s][i];
              }
            }
          }
        }
      }
    }
  }
}

template <typename T>
void run(const std::string& kernel, int mt, Problem& p) {
  if (kernel == "mma") {
    run_mma<T>(p);
  } else if (mt == 1) {
    run_simt<T, 1>(p);
  } else if (mt == 2) {
    run_simt<T, 2>(p);
  } else if (mt == 4) {
    run_simt<T, 4>(p);
  } else {
    run_simt<T, 8>(p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 14) {
    std::fprintf(stderr,
                 "usage: %s simt|mma f16|bf16 M N K GROUP COUNT SPLITS MT qweight.bin scales.bin x.bin y.bin\n",
                 argv[0]);
    return 1;
  }
  const std::string kernel = argv[1], act = argv[2];
  Problem p;
  p.m = std::atoi(argv[3]);
  p.n = std::atoi(argv[4]);
  p.k = std::atoi(argv[5]);
  p.group = std::atoi(argv[6]);
  p.count = std::atoi(argv[7]);
  p.splits = std::atoi(argv[8]);
  const int mt = std::atoi(argv[9]);
  p.qweight = read_file<uint32_t>(argv[10], static_cast<size_t>(p.count) * (p.k / 16) * 2 * p.n);
  p.scales = read_file<__half>(argv[11], static_cast<size_t>(p.count) * (p.k / p.group) * p.n);
  p.x = read_file<uint16_t>(argv[12], static_cast<size_t>(p.m) * p.count * p.k);
  p.y.assign(static_cast<size_t>(p.m) * p.count * p.n, 0.f);
  if (act == "f16") {
    run<__half>(kernel, mt, p);
  } else {
    run<__nv_bfloat16>(kernel, mt, p);
  }
  FILE* f = std::fopen(argv[13], "wb");
  if (f == nullptr || std::fwrite(p.y.data(), sizeof(float), p.y.size(), f) != p.y.size()) return 2;
  std::fclose(f);
  return 0;
}
