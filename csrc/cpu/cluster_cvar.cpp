// CPU kernel of fastdd::cluster_cvar: per cluster, the mean of its ceil(alpha * n_g) largest losses.
//
// Members are bucketed by cluster with a counting sort (stable, so each bucket lists its samples in increasing
// index order), then each cluster selects its worst k with nth_element under the order "larger loss first, lower
// index first on ties" (NaN counts as the largest loss, so it is never hidden). The selected losses are summed in
// increasing sample order, so the result does not depend on the selection algorithm. Clusters run in parallel.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cluster_cvar_checks.h"

namespace fastdd {
namespace {

// Below this many samples per task, waking a second thread costs more than the selection (and far more when another
// process holds the core: the task then waits for a scheduler slice).
constexpr int64_t kMinSamplesPerTask = 1 << 15;

// True when sample a ranks before sample b among the worst: larger loss, NaN largest, lower index on ties. Half-
// precision losses are compared as floats (exactly: widening keeps every value and order).
template <typename T>
inline bool worse(const T* losses, int64_t a, int64_t b) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  const acc_t la = static_cast<acc_t>(losses[a]), lb = static_cast<acc_t>(losses[b]);
  const bool nan_a = std::isnan(la), nan_b = std::isnan(lb);
  if (nan_a || nan_b) {
    return nan_a && (!nan_b || a < b);
  }
  return la > lb || (la == lb && a < b);
}

template <typename T>
void cluster_cvar_cpu_kernel(const T* losses, const int64_t* assign, int64_t num_samples, int64_t num_clusters,
                             double alpha, T* cvar, T* weight) {
  std::vector<int64_t> start(num_clusters + 1, 0);
  for (int64_t i = 0; i < num_samples; ++i) {
    ++start[assign[i] + 1];
  }
  for (int64_t g = 0; g < num_clusters; ++g) {
    start[g + 1] += start[g];
  }
  std::vector<int64_t> members(num_samples);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < num_samples; ++i) {
      members[fill[assign[i]]++] = i;
    }
  }
  std::fill(weight, weight + num_samples, T(0));
  const int64_t grain = std::max<int64_t>(1, kMinSamplesPerTask * num_clusters / std::max<int64_t>(1, num_samples));
  at::parallel_for(0, num_clusters, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      int64_t* first = members.data() + start[g];
      const int64_t count = start[g + 1] - start[g];
      if (count == 0) {
        cvar[g] = T(0);
        continue;
      }
      const int64_t k = cvar_tail_size(count, alpha);
      std::nth_element(first, first + (k - 1), first + count,
                       [losses](int64_t a, int64_t b) { return worse(losses, a, b); });
      std::sort(first, first + k);
      using acc_t = at::acc_type<T, /*is_cuda=*/false>;
      acc_t total = 0;
      for (int64_t r = 0; r < k; ++r) {
        total += static_cast<acc_t>(losses[first[r]]);
      }
      using share_t = std::conditional_t<std::is_same_v<T, double>, double, float>;  // float for half precision
      const T share = static_cast<T>(share_t(1) / static_cast<share_t>(k));
      for (int64_t r = 0; r < k; ++r) {
        weight[first[r]] = share;
      }
      cvar[g] = static_cast<T>(total / static_cast<acc_t>(k));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cluster_cvar_cpu(const at::Tensor& losses, const at::Tensor& assign,
                                                    int64_t num_clusters, double alpha) {
  check_cluster_cvar_inputs(losses, assign, num_clusters, alpha);
  const at::Tensor losses_c = losses.contiguous();
  const at::Tensor assign_c = assign.contiguous();
  const int64_t num_samples = losses_c.size(0);
  const int64_t* assign_data = assign_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_samples; ++i) {
    TORCH_CHECK(assign_data[i] >= 0 && assign_data[i] < num_clusters, "cluster_cvar: assign[", i, "] = ",
                assign_data[i], " is outside [0, ", num_clusters, ")");
  }
  at::Tensor cvar = at::empty({num_clusters}, losses_c.options());
  at::Tensor weight = at::empty({num_samples}, losses_c.options());
  // Losses of any floating dtype; bfloat16 and float16 ones are summed in float32 (at::acc_type) and the results
  // stored in the losses' dtype.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, losses_c.scalar_type(), "cluster_cvar_cpu", [&] {
    cluster_cvar_cpu_kernel<scalar_t>(losses_c.data_ptr<scalar_t>(), assign_data, num_samples, num_clusters, alpha,
                                      cvar.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>());
  });
  return {cvar, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("cluster_cvar", &cluster_cvar_cpu);
}

}  // namespace fastdd
