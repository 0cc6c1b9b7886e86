"""GRPO on LoRA (train_grpo): the reward library, unknown rewards and bad records refused before the model loads,
and a short run through the command that samples with the kit's prompt and stop tokens, logs rewards and KL, and
saves an adapter that loads with plain peft; and the toy whose mean reward the tiny random model can raise."""

import json
import subprocess
import sys

import pytest

from conftest import DATA, REPO
from qwen_helpers.training import rewards
from qwen_helpers.common.errors import FlagError


def test_reward_functions_score_what_they_say():
    prompts = ["<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n3 加 4 等于几？<|im_end|>\n"] * 4
    completions = ["<answer>7</answer>", "the answer is <answer> 7 </answer>", "7", "seven"]
    assert rewards.exact_match(prompts, completions, answer=["7"] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert rewards.answer_format(prompts, completions) == [1.0, 0.5, 0.0, 0.0]
    assert rewards.think_format(
        prompts, ["<think>3+4</think><answer>7</answer>", "<think></think><answer>7</answer>"]
    ) == [1.0, 0.0]
    assert rewards.length_penalty(prompts, completions, completion_ids=[[1] * 10, [1] * 2, [1], []]) == [
        -0.1,
        -0.02,
        -0.01,
        -0.0,
    ]
    # the prompt's user turn is Chinese (the English system prompt does not count): Han letters score, Latin ones do not
    assert rewards.language_match(prompts[:3], ["七", "seven", "七 is 7"]) == [1.0, 0.0, pytest.approx(1 / 3)]


@pytest.mark.parametrize("spec", ["exact", "exact_match,bogus", ","])
def test_unknown_reward_names_are_one_line(spec):
    with pytest.raises(FlagError, match="choose from exact_match, format"):
        rewards.reward_names(spec)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--reward", "exact_match,shiny"], "unknown reward 'shiny'"),
        (
            ["--reward", "exact_match", "--data_path", "BAD"],
            "record 1: the exact_match reward reads the 'answer' column",
        ),
    ],
)
def test_the_command_refuses_before_the_model_loads(flags, expected, tmp_path):
    records = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?"}]
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps(records), encoding="utf-8")
    flags = [str(bad) if flag == "BAD" else flag for flag in flags]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_helpers.train_grpo",
            "--model_path",
            "tiny",
            *flags,
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Loading weights" not in result.stderr + result.stdout and not (tmp_path / "out").exists()


def test_a_short_run_samples_scores_and_saves(tmp_path):
    from peft import PeftModel

    from qwen_helpers.models.generation import stop_token_ids
    from qwen_helpers.training.grpo import train_grpo
    from qwen_helpers.models.loading import load_base_model
    from qwen_helpers.training.dpo import publish
    from qwen_helpers.train_grpo import parse_grpo_args

    output_dir = tmp_path / "grpo"
    flags = ["--model_path", "tiny", "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language,exact_match",
             "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
             "--max_completion_length", "4", "--learning_rate", "1e-2", "--warmup_steps", "0", "--top_k", "5",
             "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
             "--output_dir", str(output_dir)]  # fmt: skip
    result = train_grpo(*parse_grpo_args(flags))
    publish(result)
    assert set(stop_token_ids(result.tokenizer)) <= set(result.trainer.eos_token_ids)  # <|im_end|> and <|endoftext|>
    assert result.trainer.train_dataset[0]["prompt"].endswith("<|im_start|>assistant\n")  # the kit's rendered prompt
    history = [r for r in json.loads((output_dir / "loss_history.json").read_text(encoding="utf-8")) if "reward" in r]
    assert len(history) == 2
    for key in (
        "reward",
        "reward_std",
        "rewards/language_match/mean",
        "rewards/exact_match/mean",
        "kl",
        "completions/mean_length",
    ):
        assert key in history[-1]
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0.0  # the policy moved away from the start after one step
    assert 0 < history[0]["completions/mean_length"] <= 4
    assert (output_dir / "adapter_model.safetensors").is_file() and not (output_dir / "ref").exists()
    PeftModel.from_pretrained(load_base_model("tiny"), str(output_dir))  # plain peft loads it


def test_the_toy_mean_reward_rises(tmp_path):
    """What the tiny random model can learn: put Han tokens first among its 5 likeliest (the language reward).
    Measured with the command (seed 0, 12 steps of 8 completions, 2-core CPU, 2026-12-07): 0.13 at step 1, 0.35 at step 12
    with two threads, 0.63 with one; the means of steps 1-4 and 9-12 were 0.15 -> 0.39 and 0.25 -> 0.50."""
    from qwen_helpers import train_grpo

    output_dir = tmp_path / "grpo"
    flags = ["--model_path", "tiny", "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language",
             "--target_modules", "all-linear", "--top_k", "5", "--learning_rate", "3e-3", "--max_steps", "12",
             "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--warmup_steps", "0",
             "--lr_scheduler_type", "constant", "--seed", "0", "--save_strategy", "no", "--report_to", "none",
             "--disable_tqdm", "True", "--output_dir", str(output_dir)]  # fmt: skip
    assert train_grpo.main(flags) == 0
    history = json.loads((output_dir / "loss_history.json").read_text(encoding="utf-8"))
    means = [record["reward"] for record in history if "reward" in record]
    assert len(means) == 12
    first, last = sum(means[:4]) / 4, sum(means[-4:]) / 4
    assert last - first > 0.08, means
    assert (output_dir / "grpo_plot.png").is_file()


def test_an_interrupted_run_resumes_and_ends_at_the_same_step(tmp_path):
    """Interrupted (as Ctrl-C would) once checkpoint-2 is saved, then --resume_from_checkpoint True: steps 3-4 run."""
    from test_train_lora import InterruptAtSave

    from qwen_helpers import train_grpo as command
    from qwen_helpers.common.files import staging_folders
    from qwen_helpers.training.grpo import train_grpo
    from qwen_helpers.train_grpo import parse_grpo_args

    output = tmp_path / "run"
    flags = ["--model_path", "tiny", "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language",
             "--max_steps", "4", "--per_device_train_batch_size", "4", "--num_generations", "4",
             "--max_completion_length", "4", "--learning_rate", "1e-3", "--warmup_steps", "0", "--save_strategy", "steps",
             "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
             "--output_dir", str(output)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train_grpo(*parse_grpo_args(flags), callbacks=[InterruptAtSave(2)])
    (staging,) = staging_folders(output)
    assert not output.exists() and [path.name for path in staging.glob("checkpoint-*")] == ["checkpoint-2"]
    assert command.main([*flags, "--resume_from_checkpoint", "True"]) == 0
    history = json.loads((output / "loss_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "reward" in record] == [1, 2, 3, 4]  # continued, not restarted
    assert staging_folders(output) == [] and not list(output.glob("checkpoint-*"))  # finished: no checkpoint kept
    assert (output / "adapter_model.safetensors").is_file() and not (output / "ref").exists()


def test_shown_completions_are_reproducible_and_leave_the_random_state_alone():
    """Notebook 08 shows a group before and after training and after a reload: the same weights and seed must give
    the same completions, another seed others, and showing them must not move the random state a run samples from."""
    import torch

    from qwen_helpers.models.loading import load_base_model, load_tokenizer
    from qwen_helpers.training.grpo import load_prompt_records, prompt_dataset, sample_completions

    tokenizer = load_tokenizer("tiny")
    model = load_base_model("tiny")
    prompts = prompt_dataset(tokenizer, load_prompt_records(DATA / "grpo_toy.json", ["language"]), False)[:2]["prompt"]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sample_completions(model, tokenizer, prompts, num_generations=3, max_new_tokens=4, top_k=5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [len(group) for group in first] == [3, 3] and len({text for group in first for text in group}) > 1
    assert sample_completions(model, tokenizer, prompts, 3, 4, top_k=5, seed=0) == first
    assert sample_completions(model, tokenizer, prompts, 3, 4, top_k=5, seed=1) != first


@pytest.mark.parametrize("value, says", [(None, "returned None"), ("1.0", "returned '1.0'"),
                                         (float("nan"), "returned nan"), (float("inf"), "returned inf")])
def test_a_reward_that_is_not_a_finite_number_is_named_with_its_completion(value, says):
    from qwen_helpers.training.grpo import RewardError, checked_reward

    def shaky(prompts, completions, **kwargs):
        return [1.0, value]

    checked = checked_reward(shaky)
    assert checked.__name__ == "shaky"  # TRL logs rewards/<name>/mean
    with pytest.raises(RewardError, match=rf"reward function shaky {says} for the completion 'second'"):
        checked(["p", "p"], ["first", "second"])
    with pytest.raises(RewardError, match="returned list of 1 values for 2 completions"):
        checked_reward(lambda prompts, completions, **kwargs: [1.0])(["p", "p"], ["a", "b"])
    assert checked_reward(lambda prompts, completions, **kwargs: [True, 0])(["p", "p"], ["a", "b"]) == [True, 0]


def test_an_all_nan_reward_stops_the_run_in_one_line_and_saves_nothing(tmp_path):
    """Before, an all-NaN reward trained 'successfully' and saved an unchanged adapter."""
    from qwen_helpers.training.grpo import RewardError, train_grpo
    from qwen_helpers.train_grpo import parse_grpo_args

    def broken(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    flags = ["--model_path", "tiny", "--data_path", str(DATA / "grpo_toy.json"), "--max_steps", "1",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "2",
             "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
             "--output_dir", str(tmp_path / "grpo")]  # fmt: skip
    with pytest.raises(RewardError, match="reward function broken returned nan"):
        train_grpo(*parse_grpo_args(flags), reward_funcs=[broken])
    assert not (tmp_path / "grpo").exists() and [path.name for path in tmp_path.iterdir()] == []
