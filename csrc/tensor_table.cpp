#include "tensor_table.h"

#include <sstream>

#include "cuda/table_layout.h"

namespace msam_fused {
namespace {

char empty_tensor_marker;

bool supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Every tensor of the row covers its elements densely in the same memory order as p, so
// element k of one is element k of the others at the same offset from data_ptr().
bool shares_dense_layout(const at::Tensor& t, const at::Tensor& p) {
  if (t.numel() <= 1) return true;
  return t.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

}  // namespace

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return (param_dtype == at::kBFloat16 || param_dtype == at::kHalf) ? at::kFloat : param_dtype;
}

at::ScalarType compute_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<Segment> TensorTable::segments(int64_t chunk) const {
  std::vector<Segment> out;
  for (int64_t row = 0; row < rows(); ++row) {
    for (int64_t begin = 0; begin < numels[row]; begin += chunk) {
      out.push_back({row, begin, std::min(begin + chunk, numels[row])});
    }
  }
  return out;
}

int64_t TensorTable::segment_count(int64_t chunk) const {
  int64_t count = 0;
  for (int64_t n : numels) count += (n + chunk - 1) / chunk;
  return count;
}

std::vector<int64_t> TensorTable::device_words(int64_t chunk) const {
  std::vector<int64_t> words;
  words.reserve(rows() * (cuda::row_words(width) + 1) + 1);
  for (int64_t r = 0; r < rows(); ++r) {
    for (int c = 0; c < width; ++c) words.push_back(reinterpret_cast<int64_t>(ptr(r, c)));
    words.push_back(numels[r]);
    words.push_back(aligned16[r] ? cuda::kRowAligned : 0);
  }
  int64_t segments = 0;
  for (int64_t r = 0; r < rows(); ++r) {
    words.push_back(segments);
    segments += (numels[r] + chunk - 1) / chunk;
  }
  words.push_back(segments);
  return words;
}

void TensorTable::write_back() {
  for (auto& [original, temporary] : writebacks_) original.copy_(temporary);
  writebacks_.clear();
  temporaries_.clear();
}

at::Tensor scalar_tensor(double value, at::ScalarType dtype, at::Device device) {
  // Made in double, then rounded as a cast rounds: a finite sum too large for float32 becomes
  // inf there (as in the reference), where at::full would refuse the value.
  return at::full({}, value, at::TensorOptions().dtype(at::kDouble).device(device)).to(dtype);
}

TableBuilder::TableBuilder(const char* op, std::vector<Column> columns, const at::Tensor& first_param)
    : op_(op), columns_(std::move(columns)) {
  table_.device = first_param.device();
  table_.param_dtype = first_param.scalar_type();
  table_.width = static_cast<int>(columns_.size());
  if (!supported_param_dtype(table_.param_dtype)) {
    fail(std::string("params[0] has dtype ") + c10::toString(table_.param_dtype) +
         "; the fused kernels support float32, float64, bfloat16 and float16 parameters");
  }
}

void TableBuilder::fail(const std::string& message) const {
  TORCH_CHECK(false, "msam_fused.", op_, ": ", message);
}

void TableBuilder::check_tensor(int64_t index, const Column& col, const at::Tensor& t,
                                const at::Tensor& p) const {
  // Messages are built only on failure: this runs for every tensor of every step.
  auto where = [&] { return std::string(col.list) + "[" + std::to_string(index) + "]"; };
  if (t.device() != table_.device) {
    std::ostringstream msg;
    msg << where() << " is on " << t.device() << " but params[0] is on " << table_.device
        << "; all tensors of one call must be on one device";
    fail(msg.str());
  }
  if (t.layout() != at::kStrided) fail(where() + " is not a dense (strided) tensor");
  at::ScalarType expected = table_.param_dtype;
  switch (col.role) {
    case Role::kParam:
    case Role::kLikeParam: expected = table_.param_dtype; break;
    case Role::kState: expected = state_dtype(table_.param_dtype); break;
    case Role::kMaster:
    case Role::kStep: expected = at::kFloat; break;
  }
  if (t.scalar_type() != expected) {
    std::ostringstream msg;
    msg << where() << " has dtype " << t.scalar_type() << ", expected " << expected;
    if (col.role == Role::kParam) msg << " (all params of one call share one dtype)";
    if (col.role == Role::kState) msg << " (state of " << table_.param_dtype << " parameters)";
    fail(msg.str());
  }
  if (col.role == Role::kStep) {
    if (t.numel() != 1) fail(where() + " must hold one element (the step count)");
  } else if (t.sizes() != p.sizes()) {
    std::ostringstream msg;
    msg << where() << " has shape " << t.sizes() << " but params[" << index << "] has shape " << p.sizes();
    fail(msg.str());
  }
}

void TableBuilder::add_row(int64_t index, std::initializer_list<const at::Tensor*> tensors) {
  TORCH_INTERNAL_ASSERT(tensors.size() == columns_.size());
  const at::Tensor* const* cols = tensors.begin();
  const at::Tensor& p = *cols[0];
  bool in_place = true;
  for (size_t c = 0; c < columns_.size(); ++c) {
    const at::Tensor* t = cols[c];
    if (t == nullptr || !t->defined()) continue;
    check_tensor(index, columns_[c], *t, p);
    if (columns_[c].role != Role::kStep) in_place = in_place && shares_dense_layout(*t, p);
  }
  bool aligned16 = true;
  for (size_t c = 0; c < columns_.size(); ++c) {
    const at::Tensor* t = cols[c];
    void* ptr = nullptr;
    if (t != nullptr && t->defined()) {
      if (!in_place && columns_[c].role != Role::kStep && !t->is_contiguous()) {
        at::Tensor copy = t->contiguous();
        table_.temporaries_.push_back(copy);  // must outlive the kernels that read it
        if (columns_[c].written) table_.writebacks_.emplace_back(*t, copy);
        ptr = copy.data_ptr();
      } else {
        ptr = t->data_ptr();
      }
      // An empty tensor has no storage (data_ptr() is null), but a null entry means "absent"
      // (no gradient, no master copy): an empty shard's gradient must still count as present,
      // e.g. for AdamW's step count. Nothing is ever read through it.
      if (ptr == nullptr) ptr = &empty_tensor_marker;
      if (columns_[c].role != Role::kStep) aligned16 = aligned16 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
    }
    table_.ptrs.push_back(ptr);
  }
  table_.numels.push_back(p.numel());
  table_.aligned16.push_back(aligned16);
}

ScalarArg scalar_arg(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return {};
  switch (t->scalar_type()) {
    case at::kBool: return {t->data_ptr(), ScalarKind::kBool};
    case at::kHalf: return {t->data_ptr(), ScalarKind::kHalf};
    case at::kBFloat16: return {t->data_ptr(), ScalarKind::kBFloat16};
    case at::kFloat: return {t->data_ptr(), ScalarKind::kFloat};
    case at::kDouble: return {t->data_ptr(), ScalarKind::kDouble};
    default: TORCH_CHECK(false, "msam_fused: a scalar argument has unsupported dtype ", t->scalar_type());
  }
}

ScalarArg TableBuilder::scalar(const char* name, const c10::optional<at::Tensor>& t,
                               bool allow_bool) const {
  if (!t.has_value() || !t->defined()) return {};
  if (t->numel() != 1) fail(std::string(name) + " must be a one-element tensor");
  if (t->device() != table_.device) {
    std::ostringstream msg;
    msg << name << " is on " << t->device() << " but params[0] is on " << table_.device;
    fail(msg.str());
  }
  const at::ScalarType dtype = t->scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || (allow_bool && dtype == at::kBool))) {
    fail(std::string(name) + " has dtype " + c10::toString(dtype) +
         (allow_bool ? "; expected bool, float32 or float64" : "; expected float32 or float64"));
  }
  return scalar_arg(t);
}

}  // namespace msam_fused
