"""Code Llama generation with the shipped default code model (runs offline in seconds): completion, infilling,
streaming, log-probabilities, the chat prompt, and the Hugging Face export checked against `transformers`.

    python examples/code_llama.py [--model CodeLlama-7b/]

``--model`` takes an official folder (params.json + consolidated.*.pth), a Hugging Face folder or one of ours.
The default model has 10.5M parameters, trained for 2.4 hours on a CPU: expect plausible Python, not
correct programs.
"""

import argparse
import tempfile

import torch

from dinollama.codellama import Generator, SamplingParams, chat_prompt_tokens, load, save_hf

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="default")
args = parser.parse_args()

model, tok = load(args.model, dtype=torch.float32)
gen = Generator(model, tok)
greedy = SamplingParams(max_gen_len=40, temperature=0.0)

# 1. Completion (greedy), batched prompts of different lengths.
prompts = ["def read_lines(path):\n", "import os\n\n\ndef makedirs(name, mode=0o777, exist_ok=False):\n"]
for prompt, text in zip(prompts, gen.text_completion(prompts, greedy)):
    print(f"--- completion\n{prompt}\033[1m{text}\033[0m")

# 2. Infilling: the middle between a prefix and a suffix (PSM layout; suffix_first=True for SPM), stops at <EOT>.
prefix = "def mean(values):\n    total = 0\n    for v in values:\n"
suffix = "\n    return total / len(values)\n"
middle = gen.text_infilling([prefix], [suffix], greedy)[0]
print(f"--- infilling\n{prefix}\033[1m{middle}\033[0m{suffix}")

# 3. Streaming with temperature sampling (seeded), stopped by a string.
print("--- streaming: ", end="")
for piece in gen.stream(tok.encode("class Stack:\n", bos=True, eos=False),
                        SamplingParams(max_gen_len=40, temperature=0.8, top_p=0.95, seed=0, stop_strings=("\n\n",))):
    print(piece, end="", flush=True)
print()

# 4. Log-probabilities of the generated tokens.
tokens, logprobs = gen.generate([tok.encode("for i in range(", bos=True, eos=False)],
                                SamplingParams(max_gen_len=5, logprobs=True))
print("--- logprobs:", [(tok.decode([t]), round(lp, 2)) for t, lp in zip(tokens[0], logprobs[0])])

# 5. The instruct chat layout (what CodeLlama-*-Instruct was trained on).
dialog = [{"role": "system", "content": "Answer with code."}, {"role": "user", "content": "Reverse a list."}]
print("--- chat prompt:", repr(tok.decode(chat_prompt_tokens(tok, dialog))))

# 6. Export to the Hugging Face layout; transformers' LlamaForCausalLM gives the same logits (if installed).
try:
    from transformers import LlamaForCausalLM
except ImportError:
    LlamaForCausalLM = None
if LlamaForCausalLM is not None:
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder, tok)
        hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        ids = torch.tensor([tok.encode(prompts[1], bos=True, eos=False)])
        with torch.inference_mode():
            ours, theirs = model(ids, start_pos=0), hf(ids).logits
        print(f"--- HF export: max |logit difference| vs transformers = {(ours - theirs).abs().max():.2e}")
