// The schemas of every msam_fused op, declared once. Kernels are registered per device in
// cpu/kernels.cpp and cuda/kernels.cu; the fake (meta) kernels live in msam_fused/fused_ops.py.
//
// Arrays are per-parameter lists of one bucket (one device, one parameter dtype). A None
// gradient means "no gradient this step"; an empty masters list means "no master weights".
// Scalar tensors (coef, grad_scale, found_inf) stay on the device: kernels read them there.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import msam_fused._C` loads this library, and with it the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(msam_fused, m) {
  // MSAM-SGD first pass (SPEC §1 steps 1-4): leaves the true updated weights in params (or in
  // masters), updates momenta, returns the sum of squares of the new momenta in norm_dtype.
  m.def(
      "msam_sgd_update_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] momenta, "
      "Tensor(c!)[] masters, float lr, float weight_decay, float momentum, Tensor coef, "
      "ScalarType norm_dtype, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  // AdamW-MSAM first pass: the same for the Adam moments; steps advance where a grad exists.
  m.def(
      "adamw_msam_update_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] masters, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, Tensor coef, ScalarType norm_dtype, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  // Finalize: rho / (sqrt(sum_of_squares) + 1e-12) as a new tensor of coef_old's dtype
  // (coef_old itself when found_inf is set).
  m.def("perturbation_coef(Tensor sum_of_squares, float rho, Tensor coef_old, Tensor? found_inf=None) -> Tensor");
  // params = base + alpha * coef * directions, base = masters if given, else params.
  // alpha = -1 applies the perturbation to true weights; alpha = 1 (0 with masters) removes it.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] directions, Tensor[] masters, Tensor coef, "
      "float alpha, Tensor? found_inf=None) -> ()");
  // SAM: the sum of squares of g (adaptive: |w| * g), and the ascent w -> w + e with w saved.
  m.def("sam_ascent_sum_of_squares(Tensor[] params, Tensor[] grads, bool adaptive, ScalarType norm_dtype) -> Tensor");
  m.def(
      "sam_ascent_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
      "bool adaptive, Tensor? found_inf=None) -> ()");
}
