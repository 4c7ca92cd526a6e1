// Evidence for docs/incoming/rpc-repack.md (not part of ollama.py): one Q4_K matrix of Gemma 3 270M times
// random heavy-tailed activations, through ggml's CPU backend twice, with the weights in the plain CPU
// buffer (what an RPC worker holds) and in the CPU_REPACK buffer (what a local runner holds), both
// against exact double-precision sums: with the activations as given, and rounded to Q8_K first.
// Build against build_llama.sh's static libraries and run (setarch -R: it crashes under ASLR, not found why):
//   B=~/.cache/ollama-py/build/0.3.36-cpu-native
//   I=~/.cache/ollama-py/src/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include
//   g++ -O2 -std=c++17 -I$I rpc-repack-matmul.cpp -o mm $B/ggml/src/libggml.a $B/ggml/src/libggml-cpu.a \
//       $B/ggml/src/ggml-rpc/libggml-rpc.a $B/ggml/src/libggml-base.a -fopenmp -lpthread -ldl -lm
//   setarch -R ./mm ~/.cache/ollama-py/gemma/gemma-3-270m-q4_k_m.gguf blk.0.attn_output.weight blk.2.ffn_down.weight
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include <string>

typedef ggml_backend_buffer_type_t * (*get_extra_t)(ggml_backend_dev_t);

static std::vector<float> run(ggml_backend_t be, ggml_backend_buffer_type_t buft, const ggml_tensor * src,
                              const void * wdata, const std::vector<float> & act, int N) {
    ggml_init_params pw = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context * cw = ggml_init(pw);
    ggml_tensor * w = ggml_new_tensor_2d(cw, src->type, src->ne[0], src->ne[1]);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(cw, buft);
    ggml_backend_tensor_set(w, wdata, 0, ggml_nbytes(w));
    ggml_init_params pa = {(size_t) 64 << 20, nullptr, false};
    ggml_context * ca = ggml_init(pa);
    ggml_tensor * a = ggml_new_tensor_2d(ca, GGML_TYPE_F32, src->ne[0], N);
    memcpy(a->data, act.data(), act.size() * sizeof(float));
    ggml_tensor * out = ggml_mul_mat(ca, w, a);
    ggml_cgraph * g = ggml_new_graph(ca);
    ggml_build_forward_expand(g, out);
    ggml_backend_graph_compute(be, g);
    std::vector<float> r((float *) out->data, (float *) out->data + ggml_nelements(out));
    ggml_free(ca); ggml_backend_buffer_free(buf); ggml_free(cw);
    return r;
}

int main(int argc, char ** argv) {
    const char * path = argv[1];
    ggml_context * meta = nullptr;
    gguf_init_params gp = {false, &meta};
    gguf_context * gg = gguf_init_from_file(path, gp);
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_t be = ggml_backend_dev_init(dev, nullptr);
    ggml_backend_cpu_set_n_threads(be, 1);
    auto get_extra = (get_extra_t) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t repack = nullptr;
    for (auto * b = get_extra(dev); b && *b; ++b) if (std::string(ggml_backend_buft_name(*b)) == "CPU_REPACK") repack = *b;
    ggml_backend_buffer_type_t plain = ggml_backend_dev_buffer_type(dev);
    printf("buffer types: %s, %s\n", ggml_backend_buft_name(plain), repack ? ggml_backend_buft_name(repack) : "none");
    std::mt19937 rng(1);
    std::student_t_distribution<float> heavy(3.0f);   // heavy tails: a few large activations, as in Gemma
    for (int ti = 2; ti < argc; ++ti) {
        ggml_tensor * t = ggml_get_tensor(meta, argv[ti]);
        const int64_t K = t->ne[0], M = t->ne[1];
        const auto * tr = ggml_get_type_traits(t->type);
        std::vector<float> wf(K * M);
        tr->to_float(t->data, wf.data(), K * M);
        const ggml_type vdt = ggml_get_type_traits_cpu(t->type)->vec_dot_type;
        for (int N : {1, 8, 64}) {
            std::vector<float> act(K * N);
            for (auto & x : act) x = heavy(rng);
            auto p = run(be, plain, t, t->data, act, N);
            auto r = run(be, repack, t, t->data, act, N);
            // references: exact activations; activations rounded as vec_dot_type (Q8_K) then exact sums
            std::vector<float> aq(K * N);
            std::vector<char> qbuf(ggml_row_size(vdt, K));
            for (int n = 0; n < N; ++n) {
                ggml_get_type_traits_cpu(vdt)->from_float(act.data() + n * K, qbuf.data(), K);
                if (vdt == GGML_TYPE_Q8_K) {          // block_q8_K: float d; int8_t qs[256]; int16_t bsums[16]
                    const size_t bsz = ggml_type_size(vdt);
                    for (int b = 0; b < K / 256; ++b) {
                        const char * blk = qbuf.data() + b * bsz; float d; memcpy(&d, blk, 4);
                        for (int j = 0; j < 256; ++j) aq[n * K + b * 256 + j] = d * (int8_t) blk[4 + j];
                    }
                } else {
                    ggml_get_type_traits(vdt)->to_float(qbuf.data(), aq.data() + n * K, K);
                }
            }
            double dp = 0, dr = 0, dpr = 0, ep = 0, er = 0, scale = 0; int same = 0;
            for (int n = 0; n < N; ++n) for (int m = 0; m < M; ++m) {
                double e = 0, eq = 0;
                for (int k = 0; k < K; ++k) { e += (double) wf[m * K + k] * act[n * K + k]; eq += (double) wf[m * K + k] * aq[n * K + k]; }
                float pv = p[n * M + m], rv = r[n * M + m];
                scale = std::max(scale, std::fabs(e));
                dp = std::max(dp, std::fabs(pv - eq)); dr = std::max(dr, std::fabs(rv - eq));
                ep = std::max(ep, std::fabs(pv - e)); er = std::max(er, std::fabs(rv - e));
                dpr = std::max(dpr, (double) std::fabs(pv - rv)); same += pv == rv;
            }
            printf("%-26s %s %4lldx%-4lld N=%-3d |out|max %8.3f  plain-vs-repack max %.2e (%d/%d equal) | vs exact(%s acts): plain %.2e repack %.2e | vs exact(f32 acts): plain %.2e repack %.2e\n",
                   argv[ti], ggml_type_name(t->type), (long long) K, (long long) M, N, scale, dpr, same, (int) (N * M),
                   ggml_type_name(vdt), dp, dr, ep, er);
        }
    }
    return 0;
}
