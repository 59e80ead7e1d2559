#include "registry.h"

namespace pyfici {
std::vector<Registrar>& registrars() {
  static std::vector<Registrar> r;
  return r;
}
void register_all(pybind11::module_& m) {
  for (auto r : registrars()) r(m);
}
void export_codes(pybind11::module_& m) {
  pybind11::dict dt;
  dt["float32"] = int(kFloat32);
  dt["float64"] = int(kFloat64);
  dt["float16"] = int(kFloat16);
  dt["bfloat16"] = int(kBFloat16);
  dt["int64"] = int(kInt64);
  dt["int32"] = int(kInt32);
  dt["uint8"] = int(kUInt8);
  dt["bool"] = int(kBool);
  m.attr("DTYPE_CODES") = dt;
  pybind11::dict mt;
  mt["sqeuclidean"] = int(kSqEuclidean);
  mt["euclidean"] = int(kEuclidean);
  mt["cosine"] = int(kCosine);
  mt["ip"] = int(kIP);
  m.attr("METRIC_CODES") = mt;
}
}  // namespace pyfici
