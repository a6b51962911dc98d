// The CPU kernel sets (DEFAULT, and AVX2 / AVX-512 where this CPU runs them) against each
// other, and the one-pass step against the contract's two passes. Run by ctest.
//
// Elementwise results must agree to the bit across capabilities (the arithmetic is the same
// and nothing is contracted into a fused multiply-add); sums of squares may differ in the
// last bits, since wider vectors add their lanes in another order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "../cpu/kernels.h"

using namespace msam_fused;
using msam_fused::cpu::Kernels;
using msam_fused::cpu::PassScalars;
using msam_fused::cpu::Sums;

namespace {

int failures = 0;

#define EXPECT(cond, what)                                                             \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: expected %s\n", __FILE__, __LINE__, what, #cond); \
      ++failures;                                                                      \
    }                                                                                  \
  } while (0)

// Sizes around the vector widths and the 32768-element segment, a 0-d tensor and an empty one.
const std::vector<std::vector<int64_t>> kShapes = {{}, {1}, {7}, {17, 3}, {0}, {1000}, {40000}, {32768}};

struct Bucket {
  std::vector<at::Tensor> params, grads, momenta, masters;
  c10::List<c10::optional<at::Tensor>> grad_list;

  // The gradients are shared unless own_grads (the overlapped step writes into them).
  Bucket clone(bool own_grads = false) const {
    Bucket b;
    for (size_t i = 0; i < params.size(); ++i) {
      b.params.push_back(params[i].clone());
      b.momenta.push_back(momenta[i].clone());
      if (!masters.empty()) b.masters.push_back(masters[i].clone());
      b.grads.push_back(own_grads ? grads[i].clone() : grads[i]);
      b.grad_list.push_back(i == 2 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(b.grads[i]));
    }
    return b;
  }
};

Bucket make_bucket(at::ScalarType dtype, bool masters) {
  at::manual_seed(0);
  Bucket b;
  for (const auto& shape : kShapes) {
    b.params.push_back(at::randn(shape).to(dtype));
    b.grads.push_back(at::randn(shape).to(dtype));
    b.momenta.push_back(at::randn(shape));
    if (dtype == at::kDouble) b.momenta.back() = b.momenta.back().to(at::kDouble);
    if (masters) b.masters.push_back(b.params.back().to(at::kFloat));
  }
  return b.clone();
}

MsamSgdArgs sgd_args(Pass pass, Bucket& b) {
  return msam_sgd_args(pass, b.params, b.grad_list, b.momenta, b.masters, 0.1, 1e-3, 0.9, {}, {},
                       at::kFloat, {}, {});
}

bool same_bits(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!at::equal(a[i], b[i])) return false;
  }
  return true;
}

void test_capabilities_agree(at::ScalarType dtype, bool masters) {
  const PassScalars k{0.25, 0.5, 2.0};
  const Bucket start = make_bucket(dtype, masters);
  const std::vector<const Kernels*> sets = cpu::runnable_kernels();
  Bucket expected = start.clone();
  const Sums expected_sums = sets.front()->msam_sgd(Pass::kSumOfSquares, sgd_args(Pass::kSumOfSquares, expected), k, nullptr);
  sets.front()->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, expected), k, nullptr);
  for (const Kernels* kernels : sets) {
    const char* what = kernels->capability;
    Bucket b = start.clone();
    const Sums sums = kernels->msam_sgd(Pass::kSumOfSquares, sgd_args(Pass::kSumOfSquares, b), k, nullptr);
    EXPECT(std::fabs(sums.squares - expected_sums.squares) <= 1e-6 * expected_sums.squares, what);
    EXPECT(sums.nonfinite == 0.0, what);
    EXPECT(same_bits(b.params, start.params), what);  // the sum-of-squares pass writes nothing
    kernels->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, b), k, nullptr);
    EXPECT(same_bits(b.params, expected.params) && same_bits(b.momenta, expected.momenta), what);
    EXPECT(same_bits(b.masters, expected.masters), what);
  }
}

// kStep == kUpdate followed by the perturbation (fp32: the update's w is stored exactly).
void test_one_pass_step_matches_two_passes() {
  const PassScalars k{0.25, 0.5, 1.0};
  const Bucket start = make_bucket(at::kFloat, false);
  for (const Kernels* kernels : cpu::runnable_kernels()) {
    Bucket one = start.clone(), two = start.clone();
    kernels->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, one), k, nullptr);
    const Sums update = kernels->msam_sgd(Pass::kUpdate, sgd_args(Pass::kUpdate, two), k, nullptr);
    Bucket untouched = start.clone();
    const Sums squares = kernels->msam_sgd(Pass::kSumOfSquares, sgd_args(Pass::kSumOfSquares, untouched), k, nullptr);
    EXPECT(update.squares == squares.squares, kernels->capability);
    kernels->perturb(perturb_args(two.params, two.momenta, {}, at::scalar_tensor(0.5), -1.0, {}), -0.5);
    EXPECT(same_bits(one.params, two.params) && same_bits(one.momenta, two.momenta), kernels->capability);
  }
}

// One non-finite gradient entry anywhere sets the flag; the sum-of-squares pass is how a step
// learns that it must be skipped.
void test_nonfinite_flag() {
  for (const Kernels* kernels : cpu::runnable_kernels()) {
    for (double bad : {INFINITY, -INFINITY, NAN}) {
      Bucket b = make_bucket(at::kFloat, false);
      b.grads[6][12345] = bad;  // in the middle of a vector of the 40000-element tensor
      const Sums sums = kernels->msam_sgd(Pass::kSumOfSquares, sgd_args(Pass::kSumOfSquares, b), {}, nullptr);
      EXPECT(std::isnan(sums.nonfinite), kernels->capability);
      b.grads[6][12345] = 0.0;
      b.grads[3].view(-1)[50] = bad;  // in the scalar tail of the 51-element tensor
      EXPECT(std::isnan(kernels->msam_sgd(Pass::kSumOfSquares, sgd_args(Pass::kSumOfSquares, b), {}, nullptr).nonfinite),
             kernels->capability);
    }
  }
}

// The overlapped step on every kernel set: kStash then kFinish give kStep's bits, the
// per-segment partial sums of kStash and kSumOfSquares are the same, and add up (in order) to
// what the pass returns.
void test_overlapped_step(at::ScalarType dtype) {
  const PassScalars k{0.25, 0.5, 2.0, true};
  const Bucket start = make_bucket(dtype, false);
  for (const Kernels* kernels : cpu::runnable_kernels()) {
    const char* what = kernels->capability;
    Bucket plain = start.clone(), ours = start.clone(/*own_grads=*/true);
    kernels->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, plain), k, nullptr);
    const MsamSgdArgs read_only = sgd_args(Pass::kSumOfSquares, ours);
    std::vector<double> expected(2 * read_only.table.segment_count(kCpuSegmentLength));
    const Sums sums = kernels->msam_sgd(Pass::kSumOfSquares, read_only, k, expected.data());
    std::vector<double> partials(expected.size()), squares, markers;
    kernels->msam_sgd(Pass::kStash, sgd_args(Pass::kStash, ours), k, partials.data());
    EXPECT(partials == expected, what);
    for (size_t i = 0; i < partials.size(); i += 2) {
      squares.push_back(partials[i]);
      markers.push_back(partials[i + 1]);
    }
    EXPECT(ordered_sum(squares) == sums.squares && ordered_sum(markers) == 0.0, what);
    Bucket skipped = ours.clone();  // the state after kStash, sharing its stashes
    kernels->msam_sgd(Pass::kFinish, sgd_args(Pass::kFinish, ours), k, nullptr);
    EXPECT(same_bits(ours.params, plain.params) && same_bits(ours.momenta, plain.momenta), what);
    PassScalars skip = k;
    skip.skipped = true;
    kernels->msam_sgd(Pass::kFinish, sgd_args(Pass::kFinish, skipped), skip, nullptr);
    EXPECT(same_bits(skipped.params, start.params) && same_bits(skipped.momenta, start.momenta), what);

  }
}

}  // namespace

int main() {
  at::set_num_threads(2);
  std::printf("CPU kernel sets:");
  for (const Kernels* k : cpu::runnable_kernels()) std::printf(" %s", k->capability);
  std::printf("\n");
  test_capabilities_agree(at::kFloat, false);
  test_capabilities_agree(at::kDouble, false);
  test_capabilities_agree(at::kBFloat16, true);
  test_overlapped_step(at::kFloat);
  test_overlapped_step(at::kDouble);
  test_capabilities_agree(at::kHalf, false);
  test_one_pass_step_matches_two_passes();
  test_nonfinite_flag();
  if (failures) {
    std::fprintf(stderr, "%d expectation(s) failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
