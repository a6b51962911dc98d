// A small cache of uploaded tensor tables.
//
// A step's tables repeat from step to step (the same parameters, state and usually the same
// gradient buffers), so each is uploaded once and then found by its contents. Nothing here
// synchronizes: an upload is an async copy from pinned memory on the current stream, and the
// key includes the stream, so every use of an entry is ordered after its upload.
//
// CUDA graphs: a captured kernel keeps reading the table it was captured with, so an entry
// used during a capture is never evicted (and an upload during capture keeps its pinned
// source alive too, since the captured copy reads it again on every replay).
#include "device_table.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cstring>
#include <list>
#include <memory>
#include <mutex>

namespace msam_fused::cuda {
namespace {

constexpr size_t kCapacity = 64;  // entries not used by a graph

struct Entry {
  std::vector<int64_t> words;
  int device;
  cudaStream_t stream;
  at::Tensor on_device, pinned_source;
  bool used_by_graph;
};

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Lets the pinned-memory allocator query its events while a graph is being captured.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() : mode_(cudaStreamCaptureModeRelaxed) {
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_));
  }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_;
};

class TableCache {
 public:
  const int64_t* get(std::vector<int64_t>&& words, int device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool in_capture = capturing(stream);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->stream == stream && it->words == words) {
        it->used_by_graph = it->used_by_graph || in_capture;
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return entries_.front().on_device.data_ptr<int64_t>();
      }
    }
    Entry entry{std::move(words), device, stream, {}, {}, in_capture};
    upload(entry, in_capture);
    entries_.push_front(std::move(entry));
    evict();
    return entries_.front().on_device.data_ptr<int64_t>();
  }

 private:
  static void upload(Entry& entry, bool in_capture) {
    const int64_t n = static_cast<int64_t>(entry.words.size());
    std::unique_ptr<RelaxedCaptureMode> relaxed;
    if (in_capture) relaxed = std::make_unique<RelaxedCaptureMode>();
    at::Tensor pinned = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), entry.words.data(), n * sizeof(int64_t));
    entry.on_device = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, entry.device));
    entry.on_device.copy_(pinned, /*non_blocking=*/true);
    if (in_capture) entry.pinned_source = pinned;
  }

  void evict() {
    size_t evictable = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (!it->used_by_graph && ++evictable > kCapacity) {
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
};

// Never destroyed: its tensors must not be freed after CUDA shuts down at exit.
TableCache& cache() {
  static TableCache* instance = new TableCache();
  return *instance;
}

}  // namespace

DeviceTable device_table(const TensorTable& table, int64_t chunk) {
  const std::vector<Segment> segments = table.segments(chunk);
  const int64_t rows = table.rows();
  std::vector<int64_t> words;
  words.reserve(rows * row_words(table.width) + 2 * segments.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < table.width; ++c) words.push_back(reinterpret_cast<int64_t>(table.ptr(r, c)));
    words.push_back(table.numels[r]);
  }
  for (const Segment& s : segments) {
    words.push_back(s.row);
    words.push_back(s.begin);
  }
  const int device = table.device.index();
  const int64_t* on_device = cache().get(std::move(words), device, c10::cuda::getCurrentCUDAStream(device).stream());
  return {on_device, rows, static_cast<int64_t>(segments.size())};
}

}  // namespace msam_fused::cuda
