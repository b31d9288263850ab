// BatchNorm + ReLU kernels of batch-last frames (batch_norm_relu.cpp); registered in sparse_conv.cpp.
#pragma once
#include <torch/extension.h>

// out (values at otop, oleft) = relu(bn(y) + res), borders zero; batch_stats: mean/var (biased) are
// computed from y and written, else read (running statistics); invstd is written either way.
void bn_relu_forward(torch::Tensor y, int64_t ytop, int64_t yleft, int64_t H, int64_t W, int64_t N,
                     torch::Tensor res, int64_t rtop, int64_t rleft, torch::Tensor gamma, torch::Tensor beta,
                     torch::Tensor mean, torch::Tensor var, torch::Tensor invstd, bool batch_stats, double eps,
                     torch::Tensor out, int64_t otop, int64_t oleft);

// gy (y's frame) = BatchNorm's input gradient of relu's masked gout, gres (if given) = the masked gout,
// both zero-bordered; dgamma, dbeta per channel.
void bn_relu_backward(torch::Tensor gout, torch::Tensor out, int64_t otop, int64_t oleft, torch::Tensor y,
                      int64_t ytop, int64_t yleft, int64_t H, int64_t W, int64_t N, torch::Tensor mean,
                      torch::Tensor invstd, torch::Tensor gamma, bool batch_stats, torch::Tensor gy,
                      torch::Tensor gres, int64_t rtop, int64_t rleft, torch::Tensor dgamma, torch::Tensor dbeta);

// Zero a frame's buffer outside its values.
void zero_frame_border(torch::Tensor t, int64_t top, int64_t left, int64_t H, int64_t W, int64_t N);
