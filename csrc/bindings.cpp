// Python bindings: the native core as `flashmoe_native._core`.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "xxh64.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_core, m) {
  m.doc() = "flashmoe_native native core";

  nb::class_<fm::Xxh64>(m, "Xxh64", "Streaming XXH64 (seed 0).")
      .def(nb::init<>())
      .def(
          "update",
          [](fm::Xxh64& h, nb::bytes data) { h.update(data.c_str(), data.size()); },
          "data"_a)
      .def(
          "update_array",
          [](fm::Xxh64& h, nb::ndarray<nb::c_contig, nb::device::cpu> a) {
            nb::gil_scoped_release release;
            h.update(a.data(), a.nbytes());
          },
          "array"_a)
      .def("digest", &fm::Xxh64::digest);
  m.def(
      "xxh64_file",
      [](const std::string& path, uint64_t offset, uint64_t length) {
        nb::gil_scoped_release release;
        return fm::xxh64_file(path, offset, length);
      },
      "path"_a, "offset"_a, "length"_a, "XXH64 of `length` bytes of a file from `offset`.");
}
