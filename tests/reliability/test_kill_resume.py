"""SIGKILL a real stage run, `--resume latest`: losses and weights equal an uninterrupted run (bitwise, CPU fp32).

The killed run is a subprocess (tests/reliability/fault_runner.py) that stops at a chosen point,
after a checkpoint or in the middle of writing one, and waits there for os.kill(pid, SIGKILL).
Uninterrupted and resumed runs happen in this process; all of them use one CPU thread.
"""
import reliability_harness as h


def latent_args(ae, out, *extra):
    return ["--config", str(h.TINY["latent"]), f"autoencoder={ae}", f"train.output_dir={out}",
            "train.max_steps=4", "train.checkpoint_every=1", "train.tracker=tensorboard", *extra]


def test_stage1_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    # tiny.yaml switches the discriminator on after step 2: the resumed steps run the GAN path.
    def args(out, *extra):
        return ["--config", str(h.TINY["ae"]), f"train.output_dir={out}", "train.max_steps=4",
                "train.checkpoint_every=1", "train.tracker=tensorboard", *extra]

    h.run_and_kill(["--pause-after-save", "ae:2"], tmp_path / "killed.marker", "ae", args(tmp_path / "killed"))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == \
        ["checkpoint-000001", "checkpoint-000002"]
    assert not (tmp_path / "killed" / "autoencoder").exists()
    h.stage("ae").main(args(tmp_path / "killed", "--resume", "latest"))
    h.stage("ae").main(args(tmp_path / "straight"))

    assert h.scalars(tmp_path / "killed" / "logs") == h.scalars(tmp_path / "straight" / "logs")
    for name in ("model", "ema", "discriminator"):
        h.assert_same_safetensors(tmp_path / "killed" / "checkpoint-000004" / f"{name}.safetensors",
                                  tmp_path / "straight" / "checkpoint-000004" / f"{name}.safetensors")
    h.assert_same_safetensors(tmp_path / "killed" / "autoencoder" / "model.safetensors",
                              tmp_path / "straight" / "autoencoder" / "model.safetensors")


def test_stage2_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_ae, tmp_path):
    killed = tmp_path / "killed"
    h.run_and_kill(["--hang-in-save", "latent:3"], tmp_path / "killed.marker", "latent",
                   latent_args(tiny_ae, killed))
    half = killed / "checkpoint-000003.tmp"
    assert (half / "model.safetensors").is_file() and not (half / "meta.json").exists()  # half written
    assert not (killed / "checkpoint-000003").exists()

    h.stage("latent").main(latent_args(tiny_ae, killed, "--resume", "latest"))
    assert not half.exists()                                   # the next save cleared it
    h.stage("latent").main(latent_args(tiny_ae, tmp_path / "straight"))

    losses = h.scalars(killed / "logs")
    assert sorted(losses["train/loss"]) == [1, 2, 3, 4]        # step 3 logged by both runs, equal values
    assert losses == h.scalars(tmp_path / "straight" / "logs")
    for name in ("model", "ema"):
        h.assert_same_safetensors(killed / "checkpoint-000004" / f"{name}.safetensors",
                                  tmp_path / "straight" / "checkpoint-000004" / f"{name}.safetensors")
    for part in ("unet", "text_encoder"):
        h.assert_same_safetensors(killed / "model" / part / "model.safetensors",
                                  tmp_path / "straight" / "model" / part / "model.safetensors")


def test_stage3_killed_mid_halving_round_resumes_exactly(teacher, tmp_path):
    # n_start=4: stage one (4-step student), round-2, round-1; the kill lands inside round-2.
    def args(name, *extra):
        return ["--config", str(h.TINY["distill"]), f"teacher={teacher}", f"train.output_dir={tmp_path / name}",
                f"model_out={tmp_path / name / 'model'}", "distill.n_start=4", "train.checkpoint_every=1",
                "train.tracker=tensorboard", *extra]

    h.run_and_kill(["--pause-after-save", "distill-round-2:1"], tmp_path / "killed.marker", "distill",
                   args("killed"))
    assert (tmp_path / "killed" / "stage-one" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "killed" / "round-2" / "student").exists()
    h.stage("distill").main(args("killed", "--resume", "latest"))
    h.stage("distill").main(args("straight"))

    killed, straight = h.scalars(tmp_path / "killed" / "logs"), h.scalars(tmp_path / "straight" / "logs")
    assert sorted(killed["round-2/loss"]) == [1, 2] and killed == straight
    for n in (4, 2, 1):
        h.assert_same_safetensors(tmp_path / "killed" / "model" / f"student-{n}" / "model.safetensors",
                                  tmp_path / "straight" / "model" / f"student-{n}" / "model.safetensors")
