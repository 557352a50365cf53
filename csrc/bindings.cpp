// Registers the compiled kernels as torch.library operators in the `ivl_kernels` namespace, so they are
// callable as torch.ops.ivl_kernels.* and traceable by torch.compile (the fake/meta implementations are
// registered from Python, in ivl_kernels/ops/guided_logits.py).

#include <Python.h>
#include <torch/library.h>

namespace ivl_kernels {
void guided_logits_decode_(const at::Tensor& value_hidden, const at::Tensor& value_weight,
                           const c10::optional<at::Tensor>& base_logits,
                           const c10::optional<at::Tensor>& base_hidden,
                           const c10::optional<at::Tensor>& base_weight,
                           const c10::optional<at::Tensor>& vocab_map, const c10::optional<at::Tensor>& alpha_tensor,
                           double alpha_scalar, double fill, at::Tensor& out);
}  // namespace ivl_kernels

TORCH_LIBRARY(ivl_kernels, m) {
  m.def(
      "guided_logits_decode_(Tensor value_hidden, Tensor value_weight, Tensor? base_logits, Tensor? base_hidden, "
      "Tensor? base_weight, Tensor? vocab_map, Tensor? alpha_tensor, float alpha_scalar, float fill, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ivl_kernels, CUDA, m) { m.impl("guided_logits_decode_", &ivl_kernels::guided_logits_decode_); }

// `import ivl_kernels._C` only needs to load this library (the static registrations above run on load).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ivl-kernels compiled CUDA operators", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
