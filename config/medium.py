# medium: 8 layers, 512 wide, 256-token context; 51.1M parameters (25.7M of them the token embedding)
out_dir = 'out-medium'
n_layer = 8  # transformer blocks
n_head = 8  # attention heads per block
n_embd = 512  # width of the residual stream
block_size = 256  # context length in tokens
dropout = 0.1  # some regularisation for long runs
batch_size = 32  # sequences per micro-step
gradient_accumulation_steps = 4  # micro-steps per optimizer step: 32K tokens per step
learning_rate = 6e-4  # peak learning rate
max_iters = 10000  # optimizer steps: the learning rate decays to a tenth over them
warmup_iters = 500  # linear warmup steps
