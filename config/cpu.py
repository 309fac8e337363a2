# cpu: the best recipe measured for 1,750 steps on 2 laptop cores (docs/recipe.md): Llama-style blocks with
# ReLU² for SwiGLU (Arcee's AFM), Muon, a 4,096-token BPE trained on the stories, and three regularisers
# for a few stories seen many times: weight decay 1.0, an average of the weights, BPE-dropout.
# 6 layers, 192 wide, 128-token context; 3.4M parameters (0.8M of them the token embedding).
#   python prepare.py --source=../shared/data/tinystories/train-sample.txt \
#       --val_source=../shared/data/tinystories/valid-sample.txt --tokenizer=bpe:4096 --bpe_dropout=0.1 \
#       --data_dir=data/sample-bpe4096
out_dir = 'out-cpu'
data_dir = 'data/sample-bpe4096'  # ~238K training tokens and 8 copies split with BPE-dropout
n_layer = 6  # transformer blocks
n_head = 3  # attention heads per block (64 wide each)
n_embd = 192  # width of the residual stream: narrower and more steps beat wider in this budget
block_size = 128  # context length in tokens
bias = False
pos_emb = 'rope'
norm = 'rmsnorm'
mlp = 'relu2'  # relu(x)^2 between two matrices: as many weights and as fast a step as SwiGLU, and better here
dropout = 0.1  # needed still: without it the model learns the stories by heart
attn_dropout = 0.0  # but not on the attention weights: the same score, and 1.2x the steps
optimizer = 'muon'  # the block matrices; the embedding and gains stay with AdamW
weight_decay = 1.0  # AdamW's and Muon's; 0.1 overfits, 3.0 underfits
ema = 0.995  # evaluate and save an average of the weights over the last ~200 steps
batch_size = 16  # sequences per step: 2K tokens
gradient_accumulation_steps = 1
learning_rate = 2e-3  # AdamW's and Muon's peak: small models take a large step
max_iters = 1750  # optimizer steps (~6 minutes at ~0.2 s a step): the learning rate decays to a tenth over them
warmup_iters = 30  # linear warmup steps
eval_interval = 438  # evaluate and save every 438 steps
eval_iters = 16  # 16 batches per split: ~33K tokens, a few seconds
log_interval = 10
compile = True  # torch.compile: ~20 s to start, then faster steps (needs a C++ compiler: g++ or clang)
