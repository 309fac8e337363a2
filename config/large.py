# large: GPT-2 small's shape, 12 layers, 768 wide, 512-token context; 124.0M parameters
out_dir = 'out-large'
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # width of the residual stream
block_size = 512  # context length in tokens
dropout = 0.1  # some regularisation for long runs
batch_size = 16  # sequences per micro-step; a 24 GB GPU holds it in bf16
gradient_accumulation_steps = 8  # micro-steps per optimizer step: 64K tokens per step
learning_rate = 6e-4  # peak learning rate, as nanoGPT's GPT-2 runs
max_iters = 20000  # optimizer steps: the learning rate decays to a tenth over them
warmup_iters = 1000  # linear warmup steps
