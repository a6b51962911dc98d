// A cache of uploaded tensor tables, keyed by their contents.
//
// A step's tables repeat from step to step (the same parameters, state and usually the same
// gradient buffers), so each is uploaded once and then found by its words (O(rows), hashed).
// Nothing here synchronizes with the device: an upload is an async copy from pinned memory on
// the calling stream, followed by an event. The rules (docs/kernels.md):
//
// * Streams. The key has no stream: a table uploaded on stream A serves stream B too (e.g. the
//   overlapped step's passes on the streams of DDP's communication hooks). B first waits for
//   the upload's event, and the table's memory is recorded as in use on B (record_stream), so
//   that evicting it never frees memory a kernel on B may still read.
// * CUDA graphs. An upload made while a stream is being captured is only a node of that graph
//   until the graph replays; if the capture is abandoned, or the graph never replays, the
//   device memory stays unfilled. Entries are therefore tagged with the capture id
//   (cudaStreamGetCaptureInfo) and used only inside that same capture. A capture may use an
//   entry uploaded outside any capture once its copy has completed. Every entry a capture
//   uses is kept for good, since the graph reads it on every replay (and an upload made
//   under capture keeps its pinned source, which the captured copy reads again each time).
// * Size. Entries no graph uses are evicted, least recently used first, beyond kCapacityBytes.
#include "device_table.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace msam_fused::cuda {
namespace {

constexpr size_t kCapacityBytes = size_t(16) << 20;  // of entries no graph uses

struct CaptureState {
  bool active = false;
  unsigned long long id = 0;
};

CaptureState capture_state(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &id));
  return {status == cudaStreamCaptureStatusActive, id};
}

// Lets the pinned-memory allocator and event queries run while a graph is being captured.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() : mode_(cudaStreamCaptureModeRelaxed) {
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_));
  }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_;
};

uint64_t hash_words(const std::vector<int64_t>& words, int device) {
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(device);  // FNV-1a
  for (int64_t w : words) {
    h ^= static_cast<uint64_t>(w);
    h *= 1099511628211ull;
  }
  return h;
}

struct Entry {
  std::vector<int64_t> words;
  uint64_t hash = 0;
  int device = 0;
  unsigned long long capture_id = 0;  // 0: uploaded outside any capture
  cudaStream_t upload_stream = nullptr;
  cudaEvent_t uploaded = nullptr;  // recorded on upload_stream after the copy
  at::Tensor on_device, pinned_source;
  std::vector<cudaStream_t> recorded_on;  // streams the memory is recorded as used on
  bool used_by_graph = false;

  size_t bytes() const { return words.size() * sizeof(int64_t); }
  ~Entry() {
    if (uploaded != nullptr) cudaEventDestroy(uploaded);
  }
};

class TableCache {
 public:
  const int64_t* get(std::vector<int64_t>&& words, int device, c10::cuda::CUDAStream stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    const CaptureState capture = capture_state(stream.stream());
    const uint64_t hash = hash_words(words, device);
    auto [first, last] = index_.equal_range(hash);
    for (auto it = first; it != last; ++it) {
      Entry& e = **it->second;
      if (e.device != device || e.words != words || !usable(e, capture)) continue;
      use_on(e, stream, capture);
      entries_.splice(entries_.begin(), entries_, it->second);  // most recently used first
      return e.on_device.data_ptr<int64_t>();
    }
    auto entry = std::make_unique<Entry>();
    entry->words = std::move(words);
    entry->hash = hash;
    entry->device = device;
    entry->capture_id = capture.active ? capture.id : 0;
    entry->used_by_graph = capture.active;
    upload(*entry, stream, capture.active);
    entries_.push_front(std::move(entry));
    index_.emplace(hash, entries_.begin());
    evict();
    return entries_.front()->on_device.data_ptr<int64_t>();
  }

 private:
  using Entries = std::list<std::unique_ptr<Entry>>;

  // Outside a capture: entries uploaded outside any capture. In capture X: X's own entries,
  // and those uploaded outside any capture whose copy has completed.
  static bool usable(const Entry& e, const CaptureState& capture) {
    if (!capture.active) return e.capture_id == 0;
    if (e.capture_id == capture.id) return true;
    if (e.capture_id != 0) return false;
    const RelaxedCaptureMode relaxed;
    const cudaError_t done = cudaEventQuery(e.uploaded);
    if (done == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: the copy is still running
      return false;
    }
    C10_CUDA_CHECK(done);
    return true;
  }

  // Orders `stream` after the upload and keeps the memory alive for its kernels.
  static void use_on(Entry& e, c10::cuda::CUDAStream stream, const CaptureState& capture) {
    if (capture.active) e.used_by_graph = true;
    if (stream.stream() == e.upload_stream) return;
    // An entry from outside the capture has completed its copy (usable), and a capture may not
    // wait for an event recorded outside it.
    if (!capture.active || e.capture_id == capture.id) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), e.uploaded, 0));
    }
    if (std::find(e.recorded_on.begin(), e.recorded_on.end(), stream.stream()) == e.recorded_on.end()) {
      c10::cuda::CUDACachingAllocator::recordStream(e.on_device.storage().data_ptr(), stream);
      e.recorded_on.push_back(stream.stream());
    }
  }

  static void upload(Entry& e, c10::cuda::CUDAStream stream, bool in_capture) {
    const int64_t n = static_cast<int64_t>(e.words.size());
    std::unique_ptr<RelaxedCaptureMode> relaxed;
    if (in_capture) relaxed = std::make_unique<RelaxedCaptureMode>();
    at::Tensor pinned = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), e.words.data(), n * sizeof(int64_t));
    e.on_device = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, e.device));
    e.on_device.copy_(pinned, /*non_blocking=*/true);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e.uploaded, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(e.uploaded, stream.stream()));
    e.upload_stream = stream.stream();
    if (in_capture) e.pinned_source = pinned;
  }

  void evict() {
    size_t bytes = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      Entry& e = **it;
      if (e.used_by_graph || (bytes += e.bytes()) <= kCapacityBytes) {
        ++it;
        continue;
      }
      auto [first, last] = index_.equal_range(e.hash);
      for (auto at = first; at != last; ++at) {
        if (at->second == it) {
          index_.erase(at);
          break;
        }
      }
      it = entries_.erase(it);
    }
  }

  std::mutex mutex_;
  Entries entries_;
  std::unordered_multimap<uint64_t, Entries::iterator> index_;
};

// Never destroyed: its tensors must not be freed after CUDA shuts down at exit.
TableCache& cache() {
  static TableCache* instance = new TableCache();
  return *instance;
}

}  // namespace

DeviceTable device_table(const TensorTable& table, int64_t chunk, c10::cuda::CUDAStream stream) {
  std::vector<int64_t> words = table.device_words(chunk);
  const int64_t rows = table.rows(), segments = words.back();
  const int64_t* on_device = cache().get(std::move(words), table.device.index(), stream);
  return {on_device, rows, segments};
}

}  // namespace msam_fused::cuda
