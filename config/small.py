# small: 6 layers, 384 wide, 128-token context; 30.0M parameters (19.3M of them the token embedding)
out_dir = 'out-small'
n_layer = 6  # transformer blocks
n_head = 6  # attention heads per block
n_embd = 384  # width of the residual stream
block_size = 128  # context length in tokens
dropout = 0.1  # some regularisation for long runs
bias = True  # biases in Linears and LayerNorms, like GPT-2
batch_size = 64  # sequences per micro-step
gradient_accumulation_steps = 2  # micro-steps per optimizer step: 16K tokens per step
learning_rate = 1e-3  # peak learning rate
max_iters = 5000  # optimizer steps: the learning rate decays to a tenth over them
warmup_iters = 200  # linear warmup steps
