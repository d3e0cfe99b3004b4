// intq_arm_runner: run a TVM Relax VM library on .npy inputs and write its outputs as .npy files.
//
//   intq_arm_runner MODEL.so OUT_DIR IN0.npy [IN1.npy ...]
//
// Loads MODEL.so (exported by tvm.compile(...).export_library for aarch64) with the TVM runtime,
// creates its Relax VM on the CPU (pooled allocator, as tvm.relax.VirtualMachine does), calls
// `main` on the inputs in the order given, and writes output k to OUT_DIR/out<k>.npy (a tuple
// result is flattened depth-first, as intq.runtime does).  Built for aarch64 by
// intq.passes.arm (see there) and run under qemu-aarch64; nothing here is aarch64-specific.
//
// The .npy reader accepts format versions 1-3, C order, little-endian or byte-sized dtypes of
// kinds b, i, u, f; that covers what numpy.save writes for the model inputs intq feeds.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct Aligned64Alloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    void* p = nullptr;
    if (posix_memalign(&p, 64, n == 0 ? 64 : n) != 0) throw std::runtime_error("out of memory");
    t->data = p;
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

[[noreturn]] void Fail(const std::string& what) { throw std::runtime_error(what); }

std::string Field(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) Fail(path + ": .npy header has no '" + key + "'");
  at = header.find(':', at);
  return header.substr(at + 1);
}

DLDataType ParseDescr(const std::string& descr, const std::string& path) {
  // descr: '<i8', '|i1', '|b1', '<f4', ...
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|')) Fail(path + ": unsupported dtype " + descr);
  int bytes = std::atoi(descr.c_str() + 2);
  DLDataType t;
  t.lanes = 1;
  t.bits = static_cast<uint8_t>(bytes * 8);
  switch (descr[1]) {
    case 'i': t.code = kDLInt; break;
    case 'u': t.code = kDLUInt; break;
    case 'f': t.code = kDLFloat; break;
    case 'b': t.code = kDLBool; break;
    default: Fail(path + ": unsupported dtype " + descr);
  }
  return t;
}

std::string Descr(DLDataType t) {
  char kind;
  switch (t.code) {
    case kDLInt: kind = 'i'; break;
    case kDLUInt: kind = 'u'; break;
    case kDLFloat: kind = 'f'; break;
    case kDLBool: kind = 'b'; break;
    default: Fail("output dtype code " + std::to_string(t.code) + " has no .npy form");
  }
  if (t.lanes != 1) Fail("vector-typed output has no .npy form");
  return std::string(t.bits == 8 ? "|" : "<") + kind + std::to_string(t.bits / 8);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(path + ": not a .npy file");
  uint32_t header_len = 0;
  unsigned char len[4] = {0, 0, 0, 0};
  if (magic[6] == 1) {
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else {
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) Fail(path + ": truncated .npy header");
  std::string descr_field = Field(header, "descr", path);
  size_t q0 = descr_field.find('\''), q1 = descr_field.find('\'', q0 + 1);
  DLDataType dtype = ParseDescr(descr_field.substr(q0 + 1, q1 - q0 - 1), path);
  std::string fortran = Field(header, "fortran_order", path);
  if (fortran.substr(0, fortran.find(',')).find("True") != std::string::npos)
    Fail(path + ": Fortran-ordered arrays are not supported; save np.ascontiguousarray(x)");
  std::string shape_field = Field(header, "shape", path);
  size_t open = shape_field.find('('), close = shape_field.find(')');
  std::string dims = shape_field.substr(open + 1, close - open - 1);
  std::vector<int64_t> shape;
  std::stringstream ss(dims);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(" ") != std::string::npos) shape.push_back(std::stoll(item));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(Aligned64Alloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                           DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) Fail(path + ": fewer data bytes than its shape needs");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU) Fail("output is not on the CPU");
  if (!t.IsContiguous()) Fail("output is not contiguous");
  std::string shape = "(";
  for (int i = 0; i < dl->ndim; ++i) {
    shape += std::to_string(dl->shape[i]) + (dl->ndim == 1 || i + 1 < dl->ndim ? "," : "");  // (5,) and (2,3)
  }
  shape += ")";
  std::string header = "{'descr': '" + Descr(dl->dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t n = static_cast<uint16_t>(header.size());
  unsigned char len[2] = {static_cast<unsigned char>(n & 0xff), static_cast<unsigned char>(n >> 8)};
  out.write(reinterpret_cast<char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t.data_ptr()) + dl->byte_offset,
            static_cast<std::streamsize>(ffi::GetDataSize(*dl)));
  if (!out) Fail(path + ": write failed");
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) Flatten(item, out);
  } else {
    Fail("main returned a value that is neither a tensor nor a tuple of tensors: " + value.GetTypeKey());
  }
}

ffi::Function Get(const ffi::Module& mod, const char* name) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name, true);
  if (!f.has_value()) Fail(std::string("the library has no function '") + name + "'; is it a Relax VM executable?");
  return *f;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.so OUT_DIR [IN.npy ...]\n";
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = Get(lib, "vm_load_executable")().cast<ffi::Module>();
    constexpr int kPooledAllocator = 2;
    Get(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    std::vector<ffi::Tensor> inputs;
    for (int i = 3; i < argc; ++i) inputs.push_back(ReadNpy(argv[i]));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    Get(vm, "main").CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    for (size_t k = 0; k < outputs.size(); ++k) {
      WriteNpy(std::string(argv[2]) + "/out" + std::to_string(k) + ".npy", outputs[k]);
    }
  } catch (const std::exception& e) {
    std::cerr << "intq_arm_runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
