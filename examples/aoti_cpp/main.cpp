// Run a MobileBERT AOTInductor package (`mobilebert export CKPT --format aoti[-bf16] --out DIR`) from C++.
//
//   run_package DIR/model.pt2 [batch] [length] [repetitions]
//
// Feeds random token ids (no padding) of shape (batch, length), prints each output's name and shape, then the
// median latency of `repetitions` calls. Build: see CMakeLists.txt (libtorch from the same torch release that
// wrote the package).
#include <ATen/cpu/Utils.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 [batch] [length] [repetitions]\n";
    return 2;
  }
  const int64_t batch = argc > 2 ? std::stoll(argv[2]) : 1;
  const int64_t length = argc > 3 ? std::stoll(argv[3]) : 128;
  const int repetitions = argc > 4 ? std::stoi(argv[4]) : 20;

  // Linux hands out AMX tile registers only to processes that ask (arch_prctl); PyTorch asks when inductor probes
  // the CPU, a C++ program must ask itself before running a package built with AMX kernels ("Illegal instruction").
  at::cpu::init_amx();
  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  auto metadata = loader.get_metadata();
  const int64_t vocab = std::stoll(metadata.at("mobilebert.vocab_size"));
  torch::manual_seed(0);
  std::vector<at::Tensor> inputs = {
      torch::randint(5, vocab, {batch, length}, torch::kLong),  // input_ids
      torch::ones({batch, length}, torch::kLong),               // attention_mask
      torch::zeros({batch, length}, torch::kLong),              // token_type_ids
  };
  std::vector<at::Tensor> outputs = loader.run(inputs);
  std::cout << metadata["mobilebert.architecture"] << " (" << metadata["mobilebert.dtype"] << ", built for "
            << metadata["mobilebert.threads"] << " threads), outputs " << metadata["mobilebert.outputs"] << "\n";
  for (const auto& t : outputs) std::cout << "  " << t.sizes() << " " << t.dtype() << "\n";

  std::vector<double> ms;
  for (int i = 0; i < repetitions + 3; ++i) {
    auto start = std::chrono::steady_clock::now();
    outputs = loader.run(inputs);
    auto stop = std::chrono::steady_clock::now();
    if (i >= 3) ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());  // 3 warm-up calls
  }
  std::sort(ms.begin(), ms.end());
  std::cout << "median " << ms[ms.size() / 2] << " ms over " << repetitions << " calls of " << batch << "x" << length
            << "\n";
  return 0;
}
