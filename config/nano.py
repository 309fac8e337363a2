# nano: 4 layers, 128 wide, 64-token context; 7.2M parameters (6.4M of them the token embedding)
out_dir = 'out-nano'
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream
block_size = 64  # context length in tokens
dropout = 0.0  # too small to overfit TinyStories
batch_size = 32  # sequences per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step: 2K tokens per step
learning_rate = 2e-3  # small models take a large step
min_lr = 2e-4  # end of the cosine decay, learning_rate / 10
max_iters = 2000  # optimizer steps
lr_decay_iters = 2000  # decay over the whole run
warmup_iters = 100  # linear warmup steps
