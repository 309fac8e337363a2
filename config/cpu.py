# cpu: 6 layers, 256 wide, 128-token context; 17.6M parameters (12.9M of them the token embedding).
# About 10 minutes on 2 laptop cores, on the sample stories:
#   python prepare.py --source=../shared/data/tinystories/train-sample.txt \
#       --val_source=../shared/data/tinystories/valid-sample.txt --data_dir=data/sample
out_dir = 'out-cpu'
data_dir = 'data/sample'  # ~235K training tokens: 750 steps see them about 6.5 times
n_layer = 6  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 256  # width of the residual stream
block_size = 128  # context length in tokens
dropout = 0.1  # the data is small and seen several times
batch_size = 16  # sequences per step: 2K tokens
gradient_accumulation_steps = 1
learning_rate = 2e-3  # small models take a large step
min_lr = 2e-4  # end of the cosine decay, learning_rate / 10
max_iters = 750  # optimizer steps
lr_decay_iters = 750  # decay over the whole run
warmup_iters = 30  # linear warmup steps
eval_interval = 150  # evaluate and save every 150 steps
eval_iters = 16  # 16 batches per split: ~33K tokens, a few seconds
log_interval = 10
