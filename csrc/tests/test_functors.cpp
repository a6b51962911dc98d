// Unit tests of the arithmetic every kernel shares (functors.h, passes.h, scalar_arg.h) and
// of the table split (tensor_table.h). Run by ctest (see CMakeLists.txt). Each expectation is
// written out from the algorithms of docs/design.md, independently of the code under test.
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "../passes.h"
#include "../scalar_arg.h"
#include "../cuda/table_layout.h"
#include "../tensor_table.h"

using namespace msam_fused;

namespace {

int failures = 0;

#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

bool near(double a, double b, double rel = 1e-15) {
  return std::fabs(a - b) <= rel * std::max(1.0, std::fabs(b));
}

void test_msam_sgd_step() {
  const MsamSgdStep<double> step{0.1, 5e-4, 0.9};
  const double p = 0.7, g = -0.3, v = 0.2;
  const double v_new = step.new_momentum(p, g, v);
  EXPECT(near(v_new, 0.9 * 0.2 + (-0.3 + 5e-4 * 0.7)));
  EXPECT(near(step.new_weight(1.5, v_new), 1.5 - 0.1 * v_new));
}

void test_msam_sgd_step_from_hyper() {
  const double hyper[MsamSgdHyper::kSize] = {0.1, 5e-4, 0.9, 0.05};
  const MsamSgdStep<float> step = MsamSgdStep<float>::from<float>(hyper);
  EXPECT(step.lr == 0.1f && step.weight_decay == 5e-4f && step.momentum == 0.9f);
}

void test_adamw_msam_step() {
  const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1, t = 3.0;
  const double hyper[AdamwMsamHyper::kSize] = {lr, b1, b2, eps, wd, 0.05};
  const AdamBias bias = adam_bias(hyper, t);
  EXPECT(near(bias.step_size, lr / (1 - std::pow(b1, t))));
  EXPECT(near(bias.bias2_sqrt, std::sqrt(1 - std::pow(b2, t))));
  const AdamwMsamStep<double> step = AdamwMsamStep<double>::from<double>(hyper, bias);
  EXPECT(step.one_minus_beta2 == 1 - b2 && step.decay == 1 - lr * wd && step.eps == eps);
  // 1 - beta is formed in double, then rounded once: not 1.0f - float(beta2).
  const AdamwMsamStep<float> single = AdamwMsamStep<float>::from<float>(hyper, bias);
  EXPECT(single.one_minus_beta2 == static_cast<float>(1 - b2));
  const double g = 0.4, m = -0.1, s = 0.02, w = 2.0;
  const double m_new = step.new_exp_avg(g, m), s_new = step.new_exp_avg_sq(g, s);
  EXPECT(near(m_new, b1 * m + (1 - b1) * g));
  EXPECT(near(s_new, b2 * s + (1 - b2) * g * g));
  const double expected = (w - bias.step_size * m_new / (std::sqrt(s_new) / bias.bias2_sqrt + eps)) * (1 - lr * wd);
  EXPECT(near(step.new_weight(w, m_new, s_new), expected));
}

void test_perturbation_and_sam() {
  EXPECT(near(perturbation_coef(4.0, 3.0), 3.0 / (2.0 + 1e-12)));
  EXPECT(perturbation_coef(0.0, 0.5) == 0.5 / 1e-12);
  EXPECT(shift(1.0, 0.5, 2.0) == 2.0);
  EXPECT(near(sam_ascent(2.0, 0.5, 0.1, false), 2.0 + 0.05));
  EXPECT(near(sam_ascent(2.0, 0.5, 0.1, true), 2.0 + 0.05 * 4.0));
  EXPECT(sam_norm_term(-3.0, 0.5, true) == 1.5);
  EXPECT(sam_norm_term(-3.0, 0.5, false) == 0.5);
  double p[1] = {-3.0}, inf_g[1] = {INFINITY};
  const Terms<double> sam = sam_norm_element<double>(SamRow<double>{p, inf_g, nullptr}, 0, true);
  EXPECT(std::isnan(sam.nonfinite));
}

void test_nonfinite_marker() {
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT(nonfinite_marker(1e300) == 0.0);
  EXPECT(std::isnan(nonfinite_marker(inf)));
  EXPECT(std::isnan(nonfinite_marker(-inf)));
  EXPECT(std::isnan(nonfinite_marker(std::nan(""))));
}

void test_scalar_args() {
  const bool yes = true;
  const float half = 0.5f;
  const double two = 2.0;
  const c10::BFloat16 quarter(0.25f);
  const c10::Half three(3.0f);
  EXPECT(read_scalar(ScalarArg{&quarter, ScalarKind::kBFloat16}, 0.0) == 0.25);
  EXPECT(read_scalar(ScalarArg{&three, ScalarKind::kHalf}, 0.0) == 3.0);
  EXPECT(read_scalar(ScalarArg{}, 7.0) == 7.0);
  EXPECT(read_scalar(ScalarArg{&half, ScalarKind::kFloat}, 0.0) == 0.5);
  EXPECT(read_scalar(ScalarArg{&two, ScalarKind::kDouble}, 0.0) == 2.0);
  EXPECT(step_skipped(ScalarArg{&yes, ScalarKind::kBool}));
  EXPECT(!step_skipped(ScalarArg{}));
  const float nan = std::nanf("");
  EXPECT(step_skipped(ScalarArg{&nan, ScalarKind::kFloat}));
}

// The read-only pass gives kStep's direction and writes nothing; kStep follows the algorithm.
void test_passes_agree() {
  const MsamSgdStep<double> step{0.1, 1e-3, 0.9};
  const PassCoefs<double> k{0.25, -0.75, 2.0, true};  // coef_old, -coef_new, grad_scale
  double g[2] = {0.3, -1.2};
  double p_step[2] = {1.0, -2.0}, v_step[2] = {0.5, 0.1};
  double p_read[2] = {1.0, -2.0}, v_read[2] = {0.5, 0.1};
  for (int i = 0; i < 2; ++i) {
    const auto read = msam_sgd_element<Pass::kPartials, true, false>(
        MsamSgdRow<double>{p_read, g, v_read, nullptr}, i, step, k);
    msam_sgd_element<Pass::kStep, true, false>(MsamSgdRow<double>{p_step, g, v_step, nullptr}, i, step, k);
    EXPECT(read.direction == v_step[i] && read.nonfinite == 0.0);
    const double p0 = i == 0 ? 1.0 : -2.0, v0 = i == 0 ? 0.5 : 0.1;
    const double v_new = 0.9 * v0 + (g[i] / 2.0 + 1e-3 * p0);
    EXPECT(near(v_step[i], v_new));
    EXPECT(near(p_step[i], ((p0 + 0.25 * v0) - 0.1 * v_new) - 0.75 * v_new));
  }
  EXPECT(p_read[0] == 1.0 && v_read[1] == 0.1);
}

// The overlapped step: kStash (v = v', the old momentum into the gradient) then kFinish give
// kStep's bits; a skipped kFinish puts the old momentum back; a row without a gradient is
// re-perturbed as in kStep.
void test_overlapped_step() {
  const MsamSgdStep<double> step{0.1, 1e-3, 0.9};
  const PassCoefs<double> k{0.25, -0.75, 2.0, true};
  double g_step[2] = {0.3, -1.2}, p_step[2] = {1.0, -2.0}, v_step[2] = {0.5, 0.1};
  double g[2] = {0.3, -1.2}, p[2] = {1.0, -2.0}, v[2] = {0.5, 0.1};
  for (int i = 0; i < 2; ++i) {
    const auto full = msam_sgd_element<Pass::kStep, true, false>(MsamSgdRow<double>{p_step, g_step, v_step, nullptr},
                                                                 i, step, k);
    const auto stashed = msam_sgd_element<Pass::kStash, true, false>(MsamSgdRow<double>{p, g, v, nullptr}, i, step, k);
    EXPECT(stashed.direction == v_step[i] && v[i] == v_step[i] && stashed.nonfinite == 0.0);
    EXPECT(g[i] == (i == 0 ? 0.5 : 0.1) && p[i] == (i == 0 ? 1.0 : -2.0));  // v_old kept, p untouched
    msam_sgd_element<Pass::kFinish, true, false>(MsamSgdRow<double>{p, g, v, nullptr}, i, step, k);
    EXPECT(p[i] == p_step[i] && v[i] == v_step[i]);
    (void)full;
  }
  double p2[1] = {1.0}, g2[1] = {0.3}, v2[1] = {0.5};
  msam_sgd_element<Pass::kStash, true, false>(MsamSgdRow<double>{p2, g2, v2, nullptr}, 0, step, k);
  msam_sgd_element<Pass::kFinish, true, false>(MsamSgdRow<double>{p2, g2, v2, nullptr}, 0, step, k, /*skipped=*/true);
  EXPECT(p2[0] == 1.0 && v2[0] == 0.5);
  double p3[1] = {1.0}, v3[1] = {0.5}, p4[1] = {1.0}, v4[1] = {0.5};
  msam_sgd_element<Pass::kStep, false, false>(MsamSgdRow<double>{p3, nullptr, v3, nullptr}, 0, step, k);
  msam_sgd_element<Pass::kFinish, false, false>(MsamSgdRow<double>{p4, nullptr, v4, nullptr}, 0, step, k);
  EXPECT(p3[0] == p4[0] && v4[0] == 0.5);
}

// A parameter without a gradient keeps w and v and is re-perturbed with the new coefficient.
void test_missing_gradient() {
  const MsamSgdStep<double> step{0.1, 1e-3, 0.9};
  const PassCoefs<double> k{0.25, -0.75, 1.0, false};
  double p[1] = {1.0}, v[1] = {0.5};
  msam_sgd_element<Pass::kStep, false, false>(MsamSgdRow<double>{p, nullptr, v, nullptr}, 0, step, k);
  EXPECT(v[0] == 0.5);
  EXPECT(near(p[0], (1.0 + 0.25 * 0.5) - 0.75 * 0.5));
}

// With a master copy the master holds w, and the parameter only ever round(w - c * v).
void test_master_weights() {
  const MsamSgdStep<float> step{0.1f, 0.0f, 0.9f};
  const PassCoefs<float> k{0.25f, -0.5f, 1.0f, false};
  c10::BFloat16 p[1] = {c10::BFloat16(1.0f)};
  c10::BFloat16 g[1] = {c10::BFloat16(0.5f)};
  float v[1] = {0.0f}, master[1] = {1.001f};
  msam_sgd_element<Pass::kStep, true, true>(MsamSgdRow<c10::BFloat16>{p, g, v, master}, 0, step, k);
  EXPECT(v[0] == 0.5f);
  EXPECT(master[0] == 1.001f - 0.1f * 0.5f);
  EXPECT(static_cast<float>(p[0]) == static_cast<float>(c10::BFloat16(master[0] - 0.5f * 0.5f)));
}

// at::vec vectors give the same bits as single elements (no fused multiply-adds either way).
void test_vector_matches_scalar() {
  using V = at::vec::Vectorized<float>;
  const int n = V::size();
  std::vector<float> p(n), g(n), v(n), pv(n), vv(n);
  for (int i = 0; i < n; ++i) {
    p[i] = 0.1f * i - 0.3f;
    g[i] = 0.07f * i * i - 1.0f;
    v[i] = 0.01f * i;
  }
  pv = p;
  vv = v;
  const MsamSgdStep<float> step{0.1f, 5e-4f, 0.9f};
  const MsamSgdStep<V> vstep{V(0.1f), V(5e-4f), V(0.9f)};
  const MsamSgdStep<V>& vs = vstep;
  const V vp = V::loadu(pv.data()), vg = V::loadu(g.data()), vvold = V::loadu(vv.data());
  const V vnew = vs.new_momentum(vp, vg, vvold);
  const V wnew = vs.new_weight(shift(vp, V(0.2f), vvold), vnew);
  float out_v[64], out_w[64];
  vnew.store(out_v);
  wnew.store(out_w);
  for (int i = 0; i < n; ++i) {
    const float v_new = step.new_momentum(p[i], g[i], v[i]);
    EXPECT(out_v[i] == v_new);
    EXPECT(out_w[i] == step.new_weight(shift(p[i], 0.2f, v[i]), v_new));
  }
}

void test_segments() {
  TensorTable table;
  table.width = 1;
  table.numels = {5, 0, 1, 12};
  int64_t data[4];
  table.ptrs = {&data[0], nullptr, &data[1], &data[2]};  // data[1] is 8 bytes off data[0]
  table.aligned16 = {true, false, false, true};
  const std::vector<Segment> s = table.segments(4);
  // row 0: [0,4) [4,5); row 1 is empty; row 2: [0,1); row 3: [0,4) [4,8) [8,12)
  EXPECT(s.size() == 6);
  EXPECT(s[0].row == 0 && s[0].begin == 0 && s[0].end == 4);
  EXPECT(s[1].row == 0 && s[1].begin == 4 && s[1].end == 5);
  EXPECT(s[2].row == 2 && s[2].end == 1);
  EXPECT(s[5].row == 3 && s[5].begin == 8 && s[5].end == 12);
  EXPECT(table.segment_count(4) == 6);

  // The CUDA table: per row pointer, numel, flags; then each row's first segment and the count.
  const std::vector<int64_t> words = table.device_words(4);
  const int64_t w = cuda::row_words(table.width);
  EXPECT(words.size() == static_cast<size_t>(4 * w + 5) && words.back() == 6);
  EXPECT(words[0] == reinterpret_cast<int64_t>(&data[0]) && words[1] == 5 && words[2] == cuda::kRowAligned);
  EXPECT(words[w] == 0 && words[w + 2] == 0);  // the empty row: no pointer, not aligned
  // Each segment (CUDA block) finds the row that owns it, skipping the empty row.
  const int64_t* first = words.data() + 4 * w;
  for (int64_t block = 0; block < 6; ++block) {
    const int64_t row = cuda::row_of_segment(first, 4, block);
    EXPECT(row == s[block].row && (block - first[row]) * 4 == s[block].begin);
  }
}

}  // namespace

int main() {
  test_msam_sgd_step();
  test_msam_sgd_step_from_hyper();
  test_overlapped_step();
  test_adamw_msam_step();
  test_perturbation_and_sam();
  test_nonfinite_marker();
  test_scalar_args();
  test_passes_agree();
  test_missing_gradient();
  test_master_weights();
  test_vector_matches_scalar();
  test_segments();
  if (failures) {
    std::fprintf(stderr, "%d expectation(s) failed\n", failures);
    return 1;
  }
  std::printf("all functor tests passed\n");
  return 0;
}
