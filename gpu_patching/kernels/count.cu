// The patch count's float fold: total[row] -= terms[row, k] for k = 0, 1, ...
//
// CAREamics 0.3.5 subtracts a sample's terms (1 - p) from prod(D / P) one
// float64 at a time, in the order its regions were first set, and float64
// subtraction does not associate: a tree or a scan rounds differently, and the
// ceil of the count can move by one. So one thread folds one row strictly in
// order, each step one IEEE-754 subtraction (the compile options turn FMA
// contraction off), bit for bit what NumPy's subtract.accumulate does on the
// host. total[row] holds the start on entry and the result on exit.
// SUBTRACT_IN_ORDER in count.py is parsed from this signature.

extern "C" __global__ void subtract_in_order(
    const double* terms,
    long long n_rows,
    long long n_terms,
    double* total) {
    // Grid-stride loop: any grid size covers every row exactly once.
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         row < n_rows; row += stride) {
        const double* row_terms = terms + row * n_terms;
        double running = total[row];
        for (long long k = 0; k < n_terms; ++k) {
            running = running - row_terms[k];
        }
        total[row] = running;
    }
}
