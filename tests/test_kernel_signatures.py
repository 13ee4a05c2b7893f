"""A kernel's parameters are read from its ``__global__`` signature in the shipped source.

``Kernel.from_source`` parses the ``.cu`` file once per process; these tests
pin the parser on known signatures, a template instantiation and malformed
text, whose errors name the file and the kernel.
"""

from __future__ import annotations

import pytest

from gpu_patching import cuda
from gpu_patching.kernels.descriptor import Kernel, kernel_dir, parse_signature

PLAIN = """
// a comment that mentions __global__ void scale(int x) { and must be ignored
extern "C" __global__ void scale(
    const double* values,  /* the input */
    long long n,
    unsigned int  factor,
    double *out) {
}
"""

TEMPLATE = """
template <typename T>
__global__ void copy(const long long* rows, long long n_rows, const T* in, T* out) {}
"""


def test_a_plain_signature_gives_every_parameter_in_order_with_normalised_types() -> None:
    assert parse_signature(PLAIN, "scale", "plain.cu") == (
        ("values", "const double*"),
        ("n", "long long"),
        ("factor", "unsigned int"),
        ("out", "double*"),
    )


def test_a_template_instantiation_substitutes_its_argument_for_the_type_parameter() -> None:
    assert parse_signature(TEMPLATE, "copy<unsigned short>", "copy.cu") == (
        ("rows", "const long long*"),
        ("n_rows", "long long"),
        ("in", "const unsigned short*"),
        ("out", "unsigned short*"),
    )


def test_the_shipped_count_kernel_has_its_known_signature() -> None:
    assert Kernel.from_source("count.cu", "subtract_in_order").params == (
        ("terms", "const double*"),
        ("n_rows", "long long"),
        ("n_terms", "long long"),
        ("total", "double*"),
    )


def test_the_shipped_crop_template_instantiates_out_at_the_element_type() -> None:
    kernel = Kernel.from_source("crop_patches.cu", "crop_patches<unsigned short>")
    assert kernel.file == "crop_patches.cu"
    assert kernel.name == "crop_patches<unsigned short>"
    assert kernel.params[0] == ("stack_table", "const long long*")
    assert kernel.params[-1] == ("out", "unsigned short*")


def test_a_kernel_is_parsed_once_per_process() -> None:
    first = Kernel.from_source("sample_epoch.cu", "sample_epoch")
    assert Kernel.from_source("sample_epoch.cu", "sample_epoch") is first


def test_the_sources_are_read_from_the_compilers_include_path() -> None:
    assert f"-I{kernel_dir()}" in cuda.compile_options()
    assert (kernel_dir() / "count.cu").is_file()


@pytest.mark.parametrize(
    ("source", "name", "message"),
    [
        (PLAIN, "missing", r"bad\.cu has no __global__ function missing"),
        (PLAIN + PLAIN, "scale", r"bad\.cu defines __global__ function scale 2 times"),
        (PLAIN, "scale<int>", r"bad\.cu: scale<int>: scale takes 0 template arguments, got 1"),
        (TEMPLATE, "copy", r"bad\.cu: copy: copy takes 1 template arguments, got 0"),
        (
            PLAIN.replace('extern "C" ', ""),
            "scale",
            r'bad\.cu: scale is not extern "C"',
        ),
        (
            PLAIN.replace("long long n,", "long long,"),
            "scale",
            r"bad\.cu: scale: parameter 2 \('long long'\) has no name",
        ),
        (
            PLAIN.replace("unsigned int  factor", "float factor"),
            "scale",
            r"bad\.cu: scale: parameter factor has C type 'float', which has no NumPy twin",
        ),
    ],
    ids=["absent", "twice", "not-a-template", "template-unnamed", "mangled", "unnamed", "type"],
)
def test_a_malformed_signature_raises_naming_the_file_and_the_kernel(
    source: str, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_signature(source, name, "bad.cu")


def test_a_missing_source_file_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"no kernel source absent\.cu"):
        Kernel.from_source("absent.cu", "anything")


# -- valid CUDA C that a kernel may be written in -------------------------------------


def test_restrict_qualifiers_are_not_part_of_a_parameters_type() -> None:
    source = (
        'extern "C" __global__ void f(const double* __restrict__ in, '
        "double *__restrict out, long long n) {}"
    )
    assert parse_signature(source, "f", "f.cu") == (
        ("in", "const double*"),
        ("out", "double*"),
        ("n", "long long"),
    )


def test_a_parameter_declared_const_passes_at_its_unqualified_type() -> None:
    # const on the parameter itself qualifies the kernel's own copy, not what is passed.
    source = (
        'extern "C" __global__ void f(const long long n, unsigned int const k, '
        "double* const out) {}"
    )
    assert parse_signature(source, "f", "f.cu") == (
        ("n", "long long"),
        ("k", "unsigned int"),
        ("out", "double*"),
    )


def test_launch_bounds_before_the_name_is_read_past() -> None:
    source = 'extern "C" __global__ void __launch_bounds__(256, 2) f(double* out) {}'
    assert parse_signature(source, "f", "f.cu") == (("out", "double*"),)


def test_a_void_parameter_list_has_no_parameters() -> None:
    assert parse_signature('extern "C" __global__ void f(void) {}', "f", "f.cu") == ()


def test_spaces_in_a_template_name_expression_are_folded() -> None:
    assert parse_signature(TEMPLATE, "copy <unsigned  short >", "copy.cu")[-1] == (
        "out",
        "unsigned short*",
    )
