// Device queries shared by the kernels' launch plans and the bindings.
#include "apm_kernels.h"

namespace apm {

int device_sm_count(int device) {
  // one query per device (the attribute cannot change while the process runs); concurrent first
  // calls write the same value
  static int counts[64] = {0};
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable && counts[device] > 0) return counts[device];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
    cudaGetLastError();                          // clear it
    return 132;                                  // an H100's
  }
  if (cacheable) counts[device] = v;
  return v;
}

}  // namespace apm
