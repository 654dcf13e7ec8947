// The token-parallel block loop of the optimized MobileBERT (mobilebert/deploy/native.py says why and when).
//
// Each of the n threads of PyTorch's OpenMP team owns a contiguous range of the N = B*T token rows and runs every
// matmul of every block on its own rows with single-threaded kernels: the rows of one token never depend on another
// token's rows except in attention, so one barrier per block (keys and values complete) is the only
// synchronisation. Every kernel is an ATen op.
//
// Per block (all NoNorm, residual steps pre-scaled: `FusedBlock.residual_scales`), weights (in, out):
//   shared bottleneck (MobileBERT):  [x | s | v] = h in_t + in_b;  [q | k] = s qkv_t + qkv_b
//   bottleneck attention (TINY):     x = h in_t + in_b;            [q | k | v] = x qkv_t + qkv_b
//   x += SDPA(q, k, v) attention_t;  per FFN: x += relu(x up_t + up_b) down_t;  h += x output_t

#include <torch/extension.h>

#include <dlfcn.h>
#include <omp.h>

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() { std::this_thread::yield(); }
#endif

namespace {

// MKL's thread-local thread count, found at run time in the MKL PyTorch links (absent from non-MKL builds).
// Inside an OpenMP region MKL runs single-threaded anyway, but 13-20% slower per call on these shapes than with
// its thread-local count set to 1 (measured: a 64x128x512 matmul on each of two threads, 60-63 against 49-51 us).
int (*mkl_set_local())(int) {
  static auto f = reinterpret_cast<int (*)(int)>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return f;
}

class MklSingleThreaded {
 public:
  MklSingleThreaded() : set_(mkl_set_local()) {
    if (set_) previous_ = set_(1);
  }
  ~MklSingleThreaded() {
    if (set_) set_(previous_);
  }

 private:
  int (*set_)(int);
  int previous_ = 0;
};

// A spinning barrier for threads that each own a core; `fail` releases everyone (a thread threw).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}

  // false: some thread failed, stop
  bool wait() {
    int generation = generation_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      for (unsigned spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
        if (failed_.load(std::memory_order_relaxed)) return false;
        if (spins > (1u << 16)) std::this_thread::yield();  // more threads than cores: let the others run
        else cpu_relax();
      }
    }
    return !failed_.load(std::memory_order_acquire);
  }

  void fail() { failed_.store(true, std::memory_order_release); }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> generation_{0};
  std::atomic<bool> failed_{false};
};

// per block: in_t, in_b, qkv_t, qkv_b, attention_t, up_t[F], up_b[F], down_t[F], output_t
constexpr int kFixed = 6;

void check_block(const std::vector<torch::Tensor>& w, int64_t D) {
  TORCH_CHECK(w.size() >= kFixed + 3 && (w.size() - kFixed) % 3 == 0, "a block takes 6 + 3*F tensors, got ",
              w.size());
  for (const auto& t : w) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                "block weights must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(w[0].dim() == 2 && w[0].size(0) == D, "in_t must be (hidden, width)");
}

}  // namespace

// h: (N, D) float32, updated in place and returned; mask: additive (B, 1, 1, T) or undefined.
torch::Tensor blocks_forward(torch::Tensor h, const c10::optional<torch::Tensor>& mask, int64_t B, int64_t T,
                             const std::vector<std::vector<torch::Tensor>>& blocks, int64_t heads, bool shared) {
  const int64_t N = h.size(0), D = h.size(1);
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat, "h must be contiguous (N, D) fp32");
  TORCH_CHECK(N == B * T, "h has ", N, " rows, expected B*T = ", B * T);
  TORCH_CHECK(!blocks.empty(), "no blocks");
  for (const auto& w : blocks) check_block(w, D);
  const int64_t I = blocks[0][4].size(0);  // attention_t: (I, I)
  TORCH_CHECK(heads > 0 && I % heads == 0, "intra size ", I, " is not divisible by ", heads, " heads");
  const int64_t d = I / heads;
  const int64_t F = (static_cast<int64_t>(blocks[0].size()) - kFixed) / 3;
  const int64_t up_width = blocks[0][kFixed - 1].size(1);
  const bool inference = c10::InferenceMode::is_enabled();

  // double-buffered: a thread writes block l+1's projections while others may still read block l's keys/values
  torch::Tensor X[2], QK[2];
  for (int i = 0; i < 2; ++i) {
    X[i] = at::empty({N, blocks[0][0].size(1)}, h.options());
    QK[i] = at::empty({N, blocks[0][2].size(1)}, h.options());
  }
  auto U = at::empty({N, up_width}, h.options());
  c10::optional<torch::Tensor> additive = mask;
  if (additive && additive->defined()) {
    TORCH_CHECK(additive->dim() == 4 && additive->size(0) == B && additive->size(3) == T,
                "mask must be additive (B, 1, 1, T)");
  } else {
    additive.reset();
  }

  std::unique_ptr<Barrier> meet;
  std::mutex error_mutex;
  std::exception_ptr error;

  // thread p of n: rows [N p / n, N (p+1) / n), which may be none (fewer rows than threads)
  auto work = [&](int p, int n) {
    Barrier& barrier = *meet;
    try {
      c10::InferenceMode inference_mode(inference);
      at::NoGradGuard no_grad;
      MklSingleThreaded single;
      const int64_t r0 = N * p / n, r1 = N * (p + 1) / n, rows = r1 - r0;
      if (rows == 0) {
        for (size_t l = 0; l < blocks.size(); ++l) barrier.wait();
        return;
      }
      auto mine = [&](const torch::Tensor& t) { return t.narrow(0, r0, rows); };
      auto h_rows = mine(h), u_rows = mine(U);
      for (size_t l = 0; l < blocks.size(); ++l) {
        const auto& w = blocks[l];
        const auto &in_t = w[0], &in_b = w[1], &qkv_t = w[2], &qkv_b = w[3], &attention_t = w[4];
        const auto& output_t = w[kFixed - 1 + 3 * F];
        auto &x_all = X[l % 2], &qk_all = QK[l % 2];
        auto x_rows = mine(x_all), qk_rows = mine(qk_all);
        at::addmm_out(x_rows, in_b, h_rows, in_t);
        auto x = x_rows.narrow(1, 0, I);
        at::addmm_out(qk_rows, qkv_b, shared ? x_rows.narrow(1, I, I) : x, qkv_t);
        const auto& v_all = shared ? x_all : qk_all;  // v: columns 2I..3I of either
        if (!barrier.wait()) return;
        // attention for my rows, per sequence they belong to: queries mine, keys and values the whole sequence
        for (int64_t b = r0 / T; b * T < r1; ++b) {
          const int64_t q0 = std::max(r0, b * T), q1 = std::min(r1, (b + 1) * T), m = q1 - q0;
          auto heads_of = [&](const torch::Tensor& t, int64_t row, int64_t len, int64_t col) {
            return t.narrow(0, row, len).narrow(1, col, I).view({1, len, heads, d}).transpose(1, 2);
          };
          auto q = heads_of(qk_all, q0, m, 0);
          auto k = heads_of(qk_all, b * T, T, I);
          auto v = heads_of(v_all, b * T, T, 2 * I);
          c10::optional<torch::Tensor> mask_b;
          if (additive) mask_b = additive->narrow(0, b, 1);
          auto context = at::scaled_dot_product_attention(q, k, v, mask_b);  // (1, H, m, d)
          x.narrow(0, q0 - r0, m).addmm_(context.transpose(1, 2).reshape({m, I}), attention_t);
        }
        for (int64_t f = 0; f < F; ++f) {
          const auto &up_t = w[kFixed - 1 + f], &up_b = w[kFixed - 1 + F + f], &down_t = w[kFixed - 1 + 2 * F + f];
          at::addmm_out(u_rows, up_b, x, up_t).relu_();
          x.addmm_(u_rows, down_t);
        }
        h_rows.addmm_(x, output_t);
      }
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
      barrier.fail();
    }
  };

  // PyTorch's own OpenMP team (torch.get_num_threads() threads; 1 when called inside a parallel region): its
  // workers are the ones already spinning after the caller's last PyTorch op, so no thread has to be woken
#pragma omp parallel
  {
#pragma omp single
    meet = std::make_unique<Barrier>(omp_get_num_threads());
    work(omp_get_thread_num(), omp_get_num_threads());
  }
  if (error) std::rethrow_exception(error);
  return h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("blocks_forward", &blocks_forward, "MobileBERT's blocks, token rows split over threads",
        py::arg("h"), py::arg("mask"), py::arg("B"), py::arg("T"), py::arg("blocks"), py::arg("heads"),
        py::arg("shared"), py::call_guard<py::gil_scoped_release>());
}
