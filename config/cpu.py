# cpu: the best recipe measured for 6 training minutes on 2 laptop cores (README, "The CPU recipe"):
# Llama-style blocks, Muon, and a 4,096-token BPE trained on the stories. 6 layers, 192 wide,
# 128-token context; 3.4M parameters (0.8M of them the token embedding, tied to the output layer).
#   python prepare.py --source=../shared/data/tinystories/train-sample.txt \
#       --val_source=../shared/data/tinystories/valid-sample.txt --tokenizer=bpe:4096 --data_dir=data/sample-bpe4096
out_dir = 'out-cpu'
data_dir = 'data/sample-bpe4096'  # ~238K training tokens: 943 steps see them about 8 times
n_layer = 6  # transformer blocks
n_head = 3  # attention heads per block (64 wide each)
n_embd = 192  # width of the residual stream: narrower and more steps beat wider in this budget
block_size = 128  # context length in tokens
bias = False
pos_emb = 'rope'
norm = 'rmsnorm'
mlp = 'swiglu'
dropout = 0.1  # 0.0 scored the same, 0.2 worse
optimizer = 'muon'  # the block matrices; the embedding and gains stay with AdamW
batch_size = 16  # sequences per step: 2K tokens
gradient_accumulation_steps = 1
learning_rate = 2e-3  # AdamW's and Muon's peak: small models take a large step
max_iters = 943  # optimizer steps (~6 minutes at ~0.36 s a step): the learning rate decays to a tenth over them
warmup_iters = 30  # linear warmup steps
eval_interval = 236  # evaluate and save every 236 steps
eval_iters = 16  # 16 batches per split: ~33K tokens, a few seconds
log_interval = 10
