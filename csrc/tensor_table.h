// The host side of every fused op: input validation, one row of data pointers per parameter,
// and the fixed split of all rows into segments that the CPU and CUDA kernels share.
//
// A multi-tensor kernel walks this table instead of one tensor, so the launches per step do
// not grow with the number of parameters, and each segment sums its squares into its own
// slot, so the global norm is the same on every run (no float atomics).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "scalar_arg.h"

namespace msam_fused {

// What a column of the table holds; decides the dtype it must have.
enum class Role {
  kParam,      // the parameter itself (float32/64, bfloat16, float16)
  kLikeParam,  // same dtype as the parameter (gradient, SAM backup)
  kState,      // optimizer state: float32 for bfloat16/float16 parameters, else the param dtype
  kMaster,     // fp32 master copy of the true weights
  kStep,       // AdamW step count: one float32 element
};

struct Column {
  const char* list;  // the argument's name, for error messages
  Role role;
  bool written;
};

// A contiguous piece of one row's elements: [begin, end) of row `row`.
struct Segment {
  int64_t row, begin, end;
};

struct TensorTable {
  at::Device device = at::kCPU;
  at::ScalarType param_dtype = at::kFloat;
  int width = 0;
  std::vector<void*> ptrs;  // rows() * width, row-major; nullptr where a tensor is absent
  std::vector<int64_t> numels;
  // Per row: whether every element pointer (all but a step count) is 16-byte aligned.
  std::vector<bool> aligned16;

  int64_t rows() const { return static_cast<int64_t>(numels.size()); }
  void* ptr(int64_t row, int col) const { return ptrs[row * width + col]; }
  // [begin, end) pieces of at most `chunk` elements, row by row, skipping empty rows.
  std::vector<Segment> segments(int64_t chunk) const;
  int64_t segment_count(int64_t chunk) const;
  // The table as the CUDA kernels read it, segments of `chunk` elements (cuda/table_layout.h);
  // its last word is the segment count.
  std::vector<int64_t> device_words(int64_t chunk) const;
  // Copies results computed in contiguous temporaries back into the caller's tensors (see
  // TableBuilder); call once the kernels have run.
  void write_back();

 private:
  friend class TableBuilder;
  std::vector<at::Tensor> temporaries_;                         // contiguous copies in use
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;  // (caller's tensor, temporary)
};

// Checks the arguments of one op call and fills a TensorTable, one row per parameter.
//
// Rows whose tensors are dense in one memory order (any order, e.g. channels_last, as long as
// every tensor of the row shares it) are used in place; any other row is computed on
// contiguous copies that TensorTable::write_back() copies back.
class TableBuilder {
 public:
  TableBuilder(const char* op, std::vector<Column> columns, const at::Tensor& first_param);

  // One row; tensors in column order, undefined where absent (allowed for optional columns).
  void add_row(int64_t index, std::initializer_list<const at::Tensor*> tensors);
  TensorTable finish() { return std::move(table_); }

  // A 0-d scalar argument on the params' device (coefficient, grad_scale, found_inf).
  ScalarArg scalar(const char* name, const c10::optional<at::Tensor>& t, bool allow_bool) const;
  [[noreturn]] void fail(const std::string& message) const;
  at::Device device() const { return table_.device; }

 private:
  void check_tensor(int64_t index, const Column& col, const at::Tensor& t, const at::Tensor& p) const;

  const char* op_;
  std::vector<Column> columns_;
  TensorTable table_;
};

// A 0-d bool/float16/bfloat16/float32/float64 tensor (or none) as a kernel argument.
ScalarArg scalar_arg(const c10::optional<at::Tensor>& t);
// The dtype optimizer state has for parameters of `param_dtype`.
at::ScalarType state_dtype(at::ScalarType param_dtype);
// float64 for float64 parameters, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType param_dtype);
// A 0-d tensor of `dtype` on `device` holding `value` (CPU results).
at::Tensor scalar_tensor(double value, at::ScalarType dtype, at::Device device);

}  // namespace msam_fused
