// Additive (Bahdanau) attention scores and their gradient in one pass over the keys each:
// a TensorFlow custom op for the CPU, built by `python -m caption_attn.fused` (make does it),
// used by `caption_attn.recurrence.teacher_forced_recurrence` in float32 on CPUs.
//
// AdditiveAttentionScores: keys (B, P, U), query (B, U), score (U,) ->
//   e (B, P, U) = tanh(keys + query), scores (B, P) = sum_u score_u e_bpu.
// AdditiveAttentionScoresGrad: e, score, d_scores (B, P) and d_keys_in (B, P, U) ->
//   d_keys = d_keys_in + g, d_query (B, U) = sum_p g, d_score (U,) = sum_bp d_scores_bp e_bpu,
//   with g_bpu = d_scores_bp score_u (1 - e_bpu^2), the gradient of keys + query.
//
// TensorFlow's ops take five passes over (B, P, U) tensors for the scores (add, tanh, the
// score matmul) and eight for their gradient (a K=1 matmul, TanhGrad, the sum over positions,
// the sum over steps, the score's matmul); these passes bound a training step's time loops
// on CPUs, whose memory is slow next to their matmuls. Here the forward pass reads the keys
// and writes e once, the backward pass reads e and d_keys_in once and writes d_keys (in place
// where TensorFlow allows). e is kept, not computed again: tanh is what costs here.

#define EIGEN_USE_THREADS
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using Row = Eigen::Array<float, Eigen::Dynamic, 1>;
using ConstRow = Eigen::Map<const Row>;
using MutableRow = Eigen::Map<Row>;

// Checks keys (B, P, U), query (B, U), score (U,) and gives B, P, U.
absl::Status CheckShapes(OpKernelContext* ctx, int64_t* B, int64_t* P, int64_t* U) {
  const Tensor& keys = ctx->input(0);
  const Tensor& query = ctx->input(1);
  const Tensor& score = ctx->input(2);
  if (keys.dims() != 3) {
    return absl::InvalidArgumentError("keys must be (B, P, U), got " +
                                      keys.shape().DebugString());
  }
  *B = keys.dim_size(0);
  *P = keys.dim_size(1);
  *U = keys.dim_size(2);
  if (query.shape() != TensorShape({*B, *U})) {
    return absl::InvalidArgumentError("query must be (B, U) of keys (B, P, U) " +
                                      keys.shape().DebugString() + ", got " +
                                      query.shape().DebugString());
  }
  if (score.shape() != TensorShape({*U})) {
    return absl::InvalidArgumentError("score must be (U,) of keys (B, P, U) " +
                                      keys.shape().DebugString() + ", got " +
                                      score.shape().DebugString());
  }
  return absl::OkStatus();
}

// Runs work(begin, end) over [0, total) on the op's CPU threads.
template <typename Work>
void Parallel(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit, Work work) {
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  if (threads == nullptr || threads->workers == nullptr) {
    work(0, total);
    return;
  }
  tensorflow::Shard(threads->workers->NumThreads(), threads->workers, total, cost_per_unit,
                    work);
}

class ScoresOp : public OpKernel {
 public:
  explicit ScoresOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    int64_t B = 0, P = 0, U = 0;
    OP_REQUIRES_OK(ctx, CheckShapes(ctx, &B, &P, &U));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, P}), &out));
    Tensor* e_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(0).shape(), &e_out));
    const float* keys = ctx->input(0).flat<float>().data();
    const float* query = ctx->input(1).flat<float>().data();
    const float* score = ctx->input(2).flat<float>().data();
    float* scores = out->flat<float>().data();
    float* e = e_out->flat<float>().data();
    Parallel(ctx, B * P, U * 30, [&](int64_t begin, int64_t end) {
      ConstRow w(score, U);
      for (int64_t i = begin; i < end; ++i) {             // i = b * P + p
        MutableRow e_i(e + i * U, U);
        e_i = (ConstRow(keys + i * U, U) + ConstRow(query + (i / P) * U, U)).tanh();
        scores[i] = (e_i * w).sum();
      }
    });
  }
};

class ScoresGradOp : public OpKernel {
 public:
  explicit ScoresGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& e_in = ctx->input(0);
    const Tensor& score = ctx->input(1);
    OP_REQUIRES(ctx, e_in.dims() == 3,
                absl::InvalidArgumentError("e must be (B, P, U), got " +
                                           e_in.shape().DebugString()));
    const int64_t B = e_in.dim_size(0), P = e_in.dim_size(1), U = e_in.dim_size(2);
    OP_REQUIRES(ctx, score.shape() == TensorShape({U}),
                absl::InvalidArgumentError("score must be (U,) of e (B, P, U) " +
                                           e_in.shape().DebugString() + ", got " +
                                           score.shape().DebugString()));
    OP_REQUIRES(ctx, ctx->input(2).shape() == TensorShape({B, P}),
                absl::InvalidArgumentError("d_scores must be (B, P) of e (B, P, U) " +
                                           e_in.shape().DebugString() + ", got " +
                                           ctx->input(2).shape().DebugString()));
    OP_REQUIRES(ctx, ctx->input(3).shape() == e_in.shape(),
                absl::InvalidArgumentError("d_keys_in must be shaped as e " +
                                           e_in.shape().DebugString() + ", got " +
                                           ctx->input(3).shape().DebugString()));
    Tensor* d_keys = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({3}, 0, e_in.shape(), &d_keys));
    Tensor* d_query = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, U}), &d_query));
    Tensor* d_score = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, score.shape(), &d_score));
    Tensor by_image;   // d_score's share of each image, summed after the threads
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({B, U}),
                                           &by_image));
    const float* e = e_in.flat<float>().data();
    const float* w = score.flat<float>().data();
    const float* ds = ctx->input(2).flat<float>().data();
    const float* dk_in = ctx->input(3).flat<float>().data();   // == dk_out when forwarded
    float* dk_out = d_keys->flat<float>().data();
    float* dq = d_query->flat<float>().data();
    float* dw = by_image.flat<float>().data();
    // one image per unit of work: its d_query row and d_score share have one writer
    Parallel(ctx, B, P * U * 6, [&](int64_t begin, int64_t end) {
      ConstRow w_row(w, U);
      Row g(U);
      for (int64_t b = begin; b < end; ++b) {
        MutableRow dq_b(dq + b * U, U), dw_b(dw + b * U, U);
        dq_b.setZero();
        dw_b.setZero();
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = b * P + p;
          ConstRow e_i(e + i * U, U);
          g = ds[i] * (1.0f - e_i.square());
          MutableRow(dk_out + i * U, U) = ConstRow(dk_in + i * U, U) + g * w_row;
          dq_b += g;
          dw_b += ds[i] * e_i;
        }
        dq_b *= w_row;
      }
    });
    MutableRow total(d_score->flat<float>().data(), U);
    total.setZero();
    for (int64_t b = 0; b < B; ++b) total += ConstRow(dw + b * U, U);
  }
};

}  // namespace

REGISTER_OP("AdditiveAttentionScores")
    .Input("keys: float")
    .Input("query: float")
    .Input("score: float")
    .Output("scores: float")
    .Output("e: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle keys;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &keys));
      c->set_output(0, c->Matrix(c->Dim(keys, 0), c->Dim(keys, 1)));
      c->set_output(1, keys);
      return absl::OkStatus();
    });

REGISTER_OP("AdditiveAttentionScoresGrad")
    .Input("e: float")
    .Input("score: float")
    .Input("d_scores: float")
    .Input("d_keys_in: float")
    .Output("d_keys: float")
    .Output("d_query: float")
    .Output("d_score: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle e;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &e));
      c->set_output(0, e);
      c->set_output(1, c->Matrix(c->Dim(e, 0), c->Dim(e, 2)));
      c->set_output(2, c->input(1));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScores").Device(tensorflow::DEVICE_CPU),
                        ScoresOp);
REGISTER_KERNEL_BUILDER(Name("AdditiveAttentionScoresGrad").Device(tensorflow::DEVICE_CPU),
                        ScoresGradOp);
