# nano: 4 layers, 128 wide, 64-token context; 7.2M parameters on GPT-2's tokens (6.4M of them the token
# embedding), 1.3M on run.sh's data/sample-bpe4096 (a 4,096-token embedding)
out_dir = 'out-nano'
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream
block_size = 64  # context length in tokens
dropout = 0.0  # too small to overfit TinyStories
batch_size = 32  # sequences per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step: 2K tokens per step
learning_rate = 2e-3  # small models take a large step
max_iters = 2000  # optimizer steps: the learning rate decays to a tenth over them
warmup_iters = 100  # linear warmup steps
