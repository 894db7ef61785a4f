// Stand-in for the header CMake generates in CUDA builds of torch (absent from CPU wheels), so the
// CUDA bindings (csrc/torch/cuda_*.cpp) can be syntax-checked against a CPU torch. A CUDA torch
// defines C10_CUDA_BUILD_MAIN_LIB here only while building torch itself: nothing to define.
#pragma once
