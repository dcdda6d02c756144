"""Fine-tuning a phase checkpoint with nothing but the stock tools, as a user would on their own text file: a plain
`transformers.Trainer` with `DataCollatorForLanguageModeling`, then peft LoRA with the default targets."""

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from modeling_ctm.training.tokenization import train_tokenizer


LINES = [
    "It was a truth universally acknowledged that a single man in possession of a good fortune must want a wife.",
    "Anne Elliot walked in the garden, and thought of all that had been lost eight years before.",
    "The morning was fine, the roads were dry, and Emma set out for Highbury in good spirits.",
    "Captain Wentworth said nothing, but his look was enough to make her heart beat.",
]


@pytest.mark.slow
def test_trainer_with_the_stock_collator_then_lora_on_a_phase_checkpoint(tmp_path):
    text_file = tmp_path / "my_text.txt"
    text_file.write_text("\n".join(LINES * 4))
    tokenizer = train_tokenizer(LINES, vocab_size=300, min_frequency=1)
    checkpoint = tmp_path / "phase-checkpoint"
    tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    dataset = load_dataset("text", data_files=str(text_file), split="train", cache_dir=str(tmp_path / "cache"))
    dataset = dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                          remove_columns=["text"])  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, use_cpu=True, report_to=[],
                logging_steps=1, save_strategy="no")  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    before = model.lm_head.weight.detach().clone()
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path / "full", **args), train_dataset=dataset,
                      data_collator=collator)  # fmt: skip
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight)

    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".self_attn." in n and "lora_" in n for n in trainable)
    Trainer(model=peft_model, args=TrainingArguments(tmp_path / "lora", **args), train_dataset=dataset,
            data_collator=collator).train()  # fmt: skip
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("Anne Elliot walked")["input_ids"]])
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter")
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, adapted, rtol=0, atol=1e-6)
        plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter learned something
