// The CPU kernel sets (DEFAULT, and AVX2 / AVX-512 where this CPU runs them) against each
// other, and the overlapped step against the plain one. Run by ctest.
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

const at::Tensor& sgd_hyper() {
  static const at::Tensor hyper = at::tensor({0.1, 1e-3, 0.9, 0.05}, at::TensorOptions().dtype(at::kDouble));
  return hyper;
}

MsamSgdArgs sgd_args(Pass pass, Bucket& b) {
  return msam_sgd_args(pass, b.params, b.grad_list, b.momenta, pass == Pass::kStep ? b.masters : at::TensorList(),
                       sgd_hyper(), {}, {}, {}, {});
}

// A pass's partials, two per segment.
std::vector<double> run_partials(const Kernels& kernels, Pass pass, Bucket& b, const PassScalars& k) {
  const MsamSgdArgs a = sgd_args(pass, b);
  std::vector<double> partials(2 * a.table.segment_count(kCpuSegmentLength));
  kernels.msam_sgd(pass, a, k, partials.data());
  return partials;
}

double total(const std::vector<double>& partials, int column) {
  double sum = 0.0;
  for (size_t i = column; i < partials.size(); i += 2) sum += partials[i];
  return sum;
}

bool same_bits(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!at::equal(a[i], b[i])) return false;
  }
  return true;
}

void test_capabilities_agree(at::ScalarType dtype, bool masters) {
  const PassScalars k{0.25, 0.5, 2.0, true};
  const Bucket start = make_bucket(dtype, masters);
  const std::vector<const Kernels*> sets = cpu::runnable_kernels();
  Bucket expected = start.clone();
  const double expected_squares = total(run_partials(*sets.front(), Pass::kPartials, expected, k), 0);
  sets.front()->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, expected), k, nullptr);
  for (const Kernels* kernels : sets) {
    const char* what = kernels->capability;
    Bucket b = start.clone();
    const std::vector<double> partials = run_partials(*kernels, Pass::kPartials, b, k);
    EXPECT(std::fabs(total(partials, 0) - expected_squares) <= 1e-6 * expected_squares, what);
    EXPECT(total(partials, 1) == 0.0, what);
    EXPECT(same_bits(b.params, start.params), what);  // the read-only pass writes nothing
    kernels->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, b), k, nullptr);
    EXPECT(same_bits(b.params, expected.params) && same_bits(b.momenta, expected.momenta), what);
    EXPECT(same_bits(b.masters, expected.masters), what);
  }
}

// One non-finite gradient entry sets its segment's marker (and no other): the read-only pass
// is how a step learns that it must be skipped.
void test_nonfinite_flag() {
  for (const Kernels* kernels : cpu::runnable_kernels()) {
    for (double bad : {INFINITY, -INFINITY, NAN}) {
      Bucket b = make_bucket(at::kFloat, false);
      b.grads[6][12345] = bad;  // in the middle of a vector of the 40000-element tensor
      std::vector<double> partials = run_partials(*kernels, Pass::kPartials, b, {});
      // segments: one per non-empty tensor before it (0-d, 1, 7, 17x3, 1000), then 40000's first
      EXPECT(std::isnan(partials[2 * 5 + 1]) && std::isnan(total(partials, 1)), kernels->capability);
      b.grads[6][12345] = 0.0;
      b.grads[3].view(-1)[50] = bad;  // in the scalar tail of the 51-element tensor
      partials = run_partials(*kernels, Pass::kPartials, b, {});
      EXPECT(std::isnan(partials[2 * 3 + 1]) && !std::isnan(partials[2 * 5 + 1]), kernels->capability);
    }
  }
}

// The overlapped step on every kernel set: kStash then kFinish give kStep's bits, and the
// per-segment partial sums of kStash and kPartials are the same.
void test_overlapped_step(at::ScalarType dtype) {
  const PassScalars k{0.25, 0.5, 2.0, true};
  const Bucket start = make_bucket(dtype, false);
  for (const Kernels* kernels : cpu::runnable_kernels()) {
    const char* what = kernels->capability;
    Bucket plain = start.clone(), ours = start.clone(/*own_grads=*/true);
    kernels->msam_sgd(Pass::kStep, sgd_args(Pass::kStep, plain), k, nullptr);
    const std::vector<double> expected = run_partials(*kernels, Pass::kPartials, ours, k);
    EXPECT(run_partials(*kernels, Pass::kStash, ours, k) == expected, what);
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
  test_nonfinite_flag();
  if (failures) {
    std::fprintf(stderr, "%d expectation(s) failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
