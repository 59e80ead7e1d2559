// The one table of dtype and metric codes, shared by the C++, CUDA and Python
// sides. Plain C++ (no pybind11), so .cu files include it too. Every native
// module exports it as DTYPE_CODES / METRIC_CODES (registry.cpp), and
// pyfici/_native.py reads those dicts instead of repeating the numbers.
#pragma once

namespace pyfici {
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kInt64 = 4, kInt32 = 5, kUInt8 = 6, kBool = 7 };
enum Metric : int { kSqEuclidean = 0, kEuclidean = 1, kCosine = 2, kIP = 3 };
}  // namespace pyfici
