// device_limits: this device's measured limits, the roofline denominators of every GPU benchmark.
//
//   build/native/device_limits [--device N] [--warmup W] [--iters N] [--copy-mib MIB]
//                              [--gemm-size N] [--algos A]
//
// Prints one JSON object to stdout:
//   copy     device-to-device copy bandwidth, two methods:
//              memcpy_d2d  cudaMemcpyAsync(DeviceToDevice) of one large buffer
//              kernel      a grid-stride 16-byte-vector copy kernel (grid = SMs x resident blocks)
//            GB/s counts READ + WRITE bytes (a copy of S bytes moves 2*S bytes), 1 GB = 1e9 bytes.
//            The copied data is checked after the kernel copy (a broken copy is an error, not a number).
//   matmul   dense D = A*B (TN, column-major) through cuBLASLt, fp32 accumulate (CUBLAS_COMPUTE_32F;
//            tf32: CUBLAS_COMPUTE_32F_FAST_TF32), inputs uniform in [-1, 1] (zeros would overstate),
//            for bf16, fp16, tf32 and fp32 (no tensor cores); FLOP = 2*M*N*K, TFLOP/s = 1e12 FLOP/s.
//            The best of the first A heuristic algorithms is kept.
// Every figure is the best (shortest) of N timed runs after W warm-up runs, timed with CUDA events.
//
// Exit status: 0 all figures measured; 2 no usable CUDA device (JSON {"error": ...} on stdout, a line on
// stderr); 3 some figures failed (their entries hold "error", the rest are printed); 1 bad arguments or
// any other failure (JSON error on stdout, message on stderr).

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string where(const char* expr, const char* file, int line) {
  std::ostringstream s;
  s << expr << " at " << file << ":" << line;
  return s.str();
}

#define CUDA_CHECK(expr)                                                                                  \
  do {                                                                                                    \
    cudaError_t err_ = (expr);                                                                            \
    if (err_ != cudaSuccess)                                                                              \
      throw CudaError(where(#expr, __FILE__, __LINE__) + ": " + cudaGetErrorName(err_) + " (" +          \
                      cudaGetErrorString(err_) + ")");                                                    \
  } while (0)

#define LT_CHECK(expr)                                                                                    \
  do {                                                                                                    \
    cublasStatus_t st_ = (expr);                                                                          \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                     \
      throw CudaError(where(#expr, __FILE__, __LINE__) + ": cuBLAS status " + std::to_string(int(st_))); \
  } while (0)

std::string json_string(const std::string& in) {
  std::string out = "\"";
  for (char c : in) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string version(int v) {  // 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

struct Options {
  int device = 0;
  int warmup = 5;
  int iters = 20;
  size_t copy_mib = 1024;  // per buffer (source and destination each)
  int gemm = 8192;
  int algos = 4;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::printf("{\"error\": %s, \"status\": \"bad_arguments\"}\n", json_string(msg).c_str());
  std::fprintf(stderr,
               "device_limits: %s\nusage: device_limits [--device N] [--warmup W] [--iters N] [--copy-mib MIB] "
               "[--gemm-size N] [--algos A]\n",
               msg.c_str());
  std::exit(1);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::printf("usage: device_limits [--device N] [--warmup W] [--iters N] [--copy-mib MIB] [--gemm-size N] "
                  "[--algos A]\n(defaults: device 0, warmup 5, iters 20, copy-mib 1024, gemm-size 8192, algos 4)\n");
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error("option " + a + " needs a value");
    char* end = nullptr;
    long v = std::strtol(argv[++i], &end, 10);
    if (*end != '\0' || v < 0) usage_error("option " + a + " expects a non-negative integer, got " + argv[i]);
    if (a == "--device") o.device = int(v);
    else if (a == "--warmup") o.warmup = int(v);
    else if (a == "--iters") o.iters = int(std::max(1L, v));
    else if (a == "--copy-mib") o.copy_mib = size_t(std::max(1L, v));
    else if (a == "--gemm-size") o.gemm = int(std::max(16L, v));
    else if (a == "--algos") o.algos = int(std::max(1L, v));
    else usage_error("unknown option " + a);
  }
  return o;
}

// ------------------------------------------------------------------------------------------- timing

struct Events {
  cudaEvent_t start{}, stop{};
  Events() {
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
};

// Best (shortest) time in seconds of `iters` runs of fn(stream) after `warmup` runs.
template <class F>
double best_of(F fn, cudaStream_t stream, int warmup, int iters) {
  Events ev;
  for (int i = 0; i < warmup; ++i) fn(stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  float best_ms = 1e30f;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(ev.start, stream));
    fn(stream);
    CUDA_CHECK(cudaEventRecord(ev.stop, stream));
    CUDA_CHECK(cudaEventSynchronize(ev.stop));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    best_ms = std::min(best_ms, ms);
  }
  return best_ms * 1e-3;
}

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) { CUDA_CHECK(cudaMalloc(&ptr, n * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// ------------------------------------------------------------------------------------------- kernels

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return uint32_t(x);
}

__global__ void fill_pattern(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = hash32(i + (uint64_t(seed) << 40));
}

__global__ void count_mismatches(const uint32_t* p, size_t n, uint32_t seed, unsigned long long* bad) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    local += p[i] != hash32(i + (uint64_t(seed) << 40));
  if (local) atomicAdd(bad, local);
}

__global__ void copy_kernel(const int4* __restrict__ src, int4* __restrict__ dst, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {  // four independent 16-byte loads in flight per thread
    int4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <class T>
__global__ void fill_uniform(T* p, size_t n, uint32_t seed) {  // uniform in [-1, 1)
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = from_float<T>(float(hash32(i + (uint64_t(seed) << 40))) * (2.0f / 4294967296.0f) - 1.0f);
}

// ------------------------------------------------------------------------------------------- copy

struct DeviceInfo {
  cudaDeviceProp prop{};
  int sm_count = 0;
};

std::string measure_copy(const Options& o, const DeviceInfo& info, cudaStream_t stream, double* best_gb_s) {
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  size_t bytes = o.copy_mib << 20;
  // Two buffers must fit in 80% of the free memory; shrink (to a 16 MiB multiple) if not.
  size_t cap = size_t(double(free_b) * 0.4) & ~((size_t(16) << 20) - 1);
  if (bytes > cap) bytes = cap;
  if (bytes < (size_t(16) << 20)) throw CudaError("not enough free device memory for the copy buffers");
  const size_t words = bytes / 4, vecs = bytes / 16;
  DeviceBuffer<uint32_t> src(words), dst(words);
  fill_pattern<<<info.sm_count * 4, 256, 0, stream>>>(src.ptr, words, 7);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaMemsetAsync(dst.ptr, 0, bytes, stream));

  const double moved = 2.0 * double(bytes);  // read + write
  double t_memcpy = best_of(
      [&](cudaStream_t s) { CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, s)); },
      stream, o.warmup, o.iters);

  const int block = 256;
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, copy_kernel, block, 0));
  const int grid = info.sm_count * std::max(1, per_sm);
  CUDA_CHECK(cudaMemsetAsync(dst.ptr, 0, bytes, stream));
  double t_kernel = best_of(
      [&](cudaStream_t s) {
        copy_kernel<<<grid, block, 0, s>>>(reinterpret_cast<const int4*>(src.ptr), reinterpret_cast<int4*>(dst.ptr),
                                           vecs);
        CUDA_CHECK(cudaGetLastError());
      },
      stream, o.warmup, o.iters);

  DeviceBuffer<unsigned long long> bad(1);
  CUDA_CHECK(cudaMemsetAsync(bad.ptr, 0, sizeof(unsigned long long), stream));
  count_mismatches<<<info.sm_count * 4, 256, 0, stream>>>(dst.ptr, words, 7, bad.ptr);
  CUDA_CHECK(cudaGetLastError());
  unsigned long long n_bad = 0;
  CUDA_CHECK(cudaMemcpyAsync(&n_bad, bad.ptr, sizeof n_bad, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (n_bad) throw CudaError("copy kernel check failed: " + std::to_string(n_bad) + " words differ from the source");

  const double gb_memcpy = moved / t_memcpy / 1e9, gb_kernel = moved / t_kernel / 1e9;
  *best_gb_s = std::max(gb_memcpy, gb_kernel);
  std::ostringstream s;
  s << "{\"bytes_per_buffer\": " << bytes << ", \"bytes_moved_per_copy\": " << size_t(moved)
    << ", \"convention\": \"GB/s = (read + write bytes) / time / 1e9\""
    << ", \"memcpy_d2d\": {\"gb_s\": " << num(gb_memcpy) << ", \"best_time_s\": " << num(t_memcpy)
    << ", \"method\": \"cudaMemcpyAsync DeviceToDevice\"}"
    << ", \"kernel\": {\"gb_s\": " << num(gb_kernel) << ", \"best_time_s\": " << num(t_kernel)
    << ", \"method\": \"grid-stride int4 copy kernel, 4 loads in flight per thread, data checked\", \"grid\": "
    << grid << ", \"block\": " << block << "}"
    << ", \"gb_s\": " << num(*best_gb_s) << "}";
  return s.str();
}

// ------------------------------------------------------------------------------------------- matmul

struct GemmKind {
  const char* name;
  cudaDataType_t ab_type, d_type;
  cublasComputeType_t compute;
  size_t elem;
  const char* compute_name;
};

template <class T>
void fill(void* p, size_t n, uint32_t seed, int sms, cudaStream_t stream) {
  fill_uniform<T><<<sms * 4, 256, 0, stream>>>(static_cast<T*>(p), n, seed);
  CUDA_CHECK(cudaGetLastError());
}

std::string measure_gemm(const Options& o, const DeviceInfo& info, cudaStream_t stream, cublasLtHandle_t lt,
                         const GemmKind& g, double* tflop_s) {
  const int64_t m = o.gemm, n = o.gemm, k = o.gemm;
  const size_t workspace_bytes = size_t(64) << 20;
  void *a = nullptr, *b = nullptr, *d = nullptr, *ws = nullptr;
  struct Free {
    void** p[4];
    ~Free() {
      for (auto q : p) cudaFree(*q);
    }
  } guard{{&a, &b, &d, &ws}};
  CUDA_CHECK(cudaMalloc(&a, size_t(m * k) * g.elem));
  CUDA_CHECK(cudaMalloc(&b, size_t(k * n) * g.elem));
  CUDA_CHECK(cudaMalloc(&d, size_t(m * n) * (g.d_type == CUDA_R_32F ? 4 : 2)));
  CUDA_CHECK(cudaMalloc(&ws, workspace_bytes));
  if (g.ab_type == CUDA_R_16BF) {
    fill<__nv_bfloat16>(a, size_t(m * k), 1, info.sm_count, stream);
    fill<__nv_bfloat16>(b, size_t(k * n), 2, info.sm_count, stream);
  } else if (g.ab_type == CUDA_R_16F) {
    fill<__half>(a, size_t(m * k), 1, info.sm_count, stream);
    fill<__half>(b, size_t(k * n), 2, info.sm_count, stream);
  } else {
    fill<float>(a, size_t(m * k), 1, info.sm_count, stream);
    fill<float>(b, size_t(k * n), 2, info.sm_count, stream);
  }

  cublasLtMatmulDesc_t op{};
  cublasLtMatrixLayout_t la{}, lb{}, ld{};
  cublasLtMatmulPreference_t pref{};
  struct Destroy {
    cublasLtMatmulDesc_t* op;
    cublasLtMatrixLayout_t *la, *lb, *ld;
    cublasLtMatmulPreference_t* pref;
    ~Destroy() {
      if (*pref) cublasLtMatmulPreferenceDestroy(*pref);
      if (*ld) cublasLtMatrixLayoutDestroy(*ld);
      if (*lb) cublasLtMatrixLayoutDestroy(*lb);
      if (*la) cublasLtMatrixLayoutDestroy(*la);
      if (*op) cublasLtMatmulDescDestroy(*op);
    }
  } destroy{&op, &la, &lb, &ld, &pref};

  // Column-major TN: A stored k x m (op T), B stored k x n, D m x n; scale (alpha, beta) in fp32.
  LT_CHECK(cublasLtMatmulDescCreate(&op, g.compute, CUDA_R_32F));
  cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a));
  LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b));
  LT_CHECK(cublasLtMatrixLayoutCreate(&la, g.ab_type, k, m, k));
  LT_CHECK(cublasLtMatrixLayoutCreate(&lb, g.ab_type, k, n, k));
  LT_CHECK(cublasLtMatrixLayoutCreate(&ld, g.d_type, m, n, m));
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws_attr = workspace_bytes;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_attr,
                                                sizeof ws_attr));
  std::vector<cublasLtMatmulHeuristicResult_t> heur(std::max(1, o.algos));
  int found = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, int(heur.size()), heur.data(), &found));
  if (found == 0) throw CudaError(std::string("cuBLASLt has no algorithm for ") + g.name + " on this device");

  const float alpha = 1.f, beta = 0.f;
  double best_t = 1e30;
  int best_i = -1;
  for (int i = 0; i < found; ++i) {
    double t = best_of(
        [&](cudaStream_t s) {
          LT_CHECK(cublasLtMatmul(lt, op, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &heur[i].algo, ws,
                                  workspace_bytes, s));
        },
        stream, o.warmup, o.iters);
    if (t < best_t) best_t = t, best_i = i;
  }
  const double flop = 2.0 * double(m) * double(n) * double(k);
  *tflop_s = flop / best_t / 1e12;
  std::ostringstream s;
  s << "{\"m\": " << m << ", \"n\": " << n << ", \"k\": " << k << ", \"tflop_s\": " << num(*tflop_s)
    << ", \"best_time_s\": " << num(best_t) << ", \"flop\": " << num(flop)
    << ", \"method\": " << json_string(std::string("cublasLtMatmul TN column-major, A/B ") + g.name + ", D " +
                                       (g.d_type == CUDA_R_32F ? "fp32" : g.name) + ", " + g.compute_name +
                                       ", alpha 1 beta 0, inputs uniform [-1,1)")
    << ", \"algorithms_timed\": " << found << ", \"best_algorithm_rank\": " << best_i
    << ", \"workspace_bytes\": " << workspace_bytes << "}";
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::string why = err != cudaSuccess ? std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")"
                                         : std::string("cudaGetDeviceCount returned 0 devices");
    std::printf("{\"error\": %s, \"status\": \"no_device\"}\n", json_string("no usable CUDA device: " + why).c_str());
    std::fprintf(stderr, "device_limits: no usable CUDA device: %s\n", why.c_str());
    return 2;
  }
  if (o.device >= count) usage_error("--device " + std::to_string(o.device) + ": only " + std::to_string(count) +
                                     " device(s)");
  try {
    DeviceInfo info;
    CUDA_CHECK(cudaSetDevice(o.device));
    CUDA_CHECK(cudaGetDeviceProperties(&info.prop, o.device));
    info.sm_count = info.prop.multiProcessorCount;
    int driver = 0, runtime = 0;
    CUDA_CHECK(cudaDriverGetVersion(&driver));
    CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    cudaStream_t stream{};
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cublasLtHandle_t lt{};
    LT_CHECK(cublasLtCreate(&lt));

    int failures = 0;
    std::ostringstream out;
    out << "{\"schema\": \"lt-engine/device-limits/1\", \"source\": \"native\""
        << ", \"probe\": \"benchmarks/native/device_limits.cu\""
        << ", \"device\": {\"index\": " << o.device << ", \"name\": " << json_string(info.prop.name)
        << ", \"compute_capability\": \"" << info.prop.major << "." << info.prop.minor << "\""
        << ", \"sm_count\": " << info.sm_count << ", \"total_memory_bytes\": " << info.prop.totalGlobalMem
        << ", \"l2_cache_bytes\": " << info.prop.l2CacheSize << "}"
        << ", \"driver_version\": \"" << version(driver) << "\", \"runtime_version\": \"" << version(runtime) << "\""
        << ", \"cublaslt_version\": " << cublasLtGetVersion()
        << ", \"settings\": {\"warmup\": " << o.warmup << ", \"iters\": " << o.iters
        << ", \"statistic\": \"best (shortest) of iters after warmup, CUDA events\"}";

    double copy_gb_s = 0;
    try {
      const std::string copy = measure_copy(o, info, stream, &copy_gb_s);  // before writing: no half entry
      out << ", \"copy\": " << copy;
    } catch (const CudaError& e) {
      ++failures;
      out << ", \"copy\": {\"error\": " << json_string(e.what()) << "}";
      std::fprintf(stderr, "device_limits: copy: %s\n", e.what());
    }

    const GemmKind kinds[] = {
        {"bf16", CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, 2, "CUBLAS_COMPUTE_32F"},
        {"fp16", CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_32F, 2, "CUBLAS_COMPUTE_32F"},
        {"tf32", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, 4, "CUBLAS_COMPUTE_32F_FAST_TF32"},
        {"fp32", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 4, "CUBLAS_COMPUTE_32F (no tensor cores)"},
    };
    out << ", \"matmul\": {";
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; ++i) {
      double tf = 0;
      out << (i ? ", " : "") << "\"" << kinds[i].name << "\": ";
      try {
        const std::string entry = measure_gemm(o, info, stream, lt, kinds[i], &tf);
        out << entry;
      } catch (const CudaError& e) {
        ++failures;
        out << "{\"error\": " << json_string(e.what()) << "}";
        std::fprintf(stderr, "device_limits: matmul %s: %s\n", kinds[i].name, e.what());
      }
    }
    out << "}, \"failures\": " << failures << "}";
    cublasLtDestroy(lt);
    cudaStreamDestroy(stream);
    std::printf("%s\n", out.str().c_str());
    return failures ? 3 : 0;
  } catch (const std::exception& e) {
    std::printf("{\"error\": %s, \"status\": \"failed\"}\n", json_string(e.what()).c_str());
    std::fprintf(stderr, "device_limits: %s\n", e.what());
    return 1;
  }
}
