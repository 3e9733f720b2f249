"""`alexnet push` keeps a team study in step with the local one: pushing again after the sweep resumed
locally sends the new runs and trials, a push stopped after the study was created is completed by the
next, and push says what was new. Fast: the "team" is a second SQLite MLflow store and Optuna storage
(tests/test_scale_out.py pushes a real sweep to PostgreSQL and an MLflow server)."""

import logging

import mlflow
import optuna
import pytest
from mlflow.entities import Metric
from optuna.distributions import FloatDistribution

from alexnet import UsageError
from alexnet.sweep.study import tally
from alexnet.team import push

STUDY = "moved"
LR = {"lr": FloatDistribution(0.005, 0.05, log=True)}


@pytest.fixture
def stores(home, tmp_path, monkeypatch):
    """The laptop (the project's own stores under `home`) and the team's (another folder)."""
    monkeypatch.chdir(tmp_path)  # a store made by push keeps its artifacts under ./mlruns here
    team = tmp_path / "team"
    team.mkdir()
    laptop_uri = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    (home / "mlruns").mkdir(exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=laptop_uri)
    exp = client.create_experiment("alexnet-sweeps", artifact_location=(home / "mlruns" / "artifacts").as_uri())
    parent = client.create_run(exp, run_name=STUDY, tags={"sweep.study": STUDY, "sweep.role": "parent"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    storage = f"sqlite:///{home / 'mlruns' / 'optuna.db'}"
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", parent)
    study.set_user_attr("objective", "val/best_acc")
    yield {"client": client, "exp": exp, "parent": parent, "study": study, "storage": storage,
           "team_uri": f"sqlite:///{team / 'mlflow.db'}", "team_storage": f"sqlite:///{team / 'optuna.db'}"}
    mlflow.set_tracking_uri(None)


def train_locally(stores, n: int) -> None:
    """`n` more finished trials on the laptop, each with its MLflow run, as a sweep leaves them."""
    client, study = stores["client"], stores["study"]
    for _ in range(n):
        number = len(study.trials)
        value = [0.31, 0.42, 0.42, 0.29, 0.5][number]  # two tied values
        run = client.create_run(stores["exp"], run_name=f"{STUDY}-trial-{number}",
                                tags={"sweep.study": STUDY, "sweep.role": "trial", "sweep.trial": str(number),
                                      "mlflow.parentRunId": stores["parent"]}).info.run_id
        client.log_batch(run, metrics=[Metric("val/best_acc", value, 0, 0)])
        client.set_terminated(run, "FINISHED")
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.01 * (number + 1)}, distributions=LR, value=value,
                                                  user_attrs={"mlflow_run_id": run}, intermediate_values={0: value}))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def do_push(stores, capfd) -> str:
    """Push the study; returns what push printed, and what Optuna logged at its default verbosity (INFO)."""
    optuna_log = Lines()
    logging.getLogger("optuna").addHandler(optuna_log)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        assert push.push(stores["team_uri"], stores["team_storage"], None, STUDY, None, None) == 0
    finally:
        logging.getLogger("optuna").removeHandler(optuna_log)
    return capfd.readouterr().err + "".join(f"[optuna] {line}\n" for line in optuna_log.lines)


def check_team_holds_every_trial(stores) -> None:
    """The team's study holds each local trial once, with its number, params, value, times, and its run
    id rewritten to the pushed copy's; its exact count is the laptop's."""
    team = optuna.load_study(study_name=STUDY, storage=stores["team_storage"])
    dst = mlflow.MlflowClient(tracking_uri=stores["team_uri"])
    copies = {r.data.tags["pushed.from_run_id"]: r.info.run_id
              for r in dst.search_runs([e.experiment_id for e in dst.search_experiments()])}
    local = stores["study"].trials
    assert [(t.number, t.state, t.params, t.values, t.datetime_start, t.datetime_complete, t.intermediate_values)
            for t in team.trials] == \
        [(t.number, t.state, t.params, t.values, t.datetime_start, t.datetime_complete, t.intermediate_values)
         for t in local]
    assert [t.user_attrs["mlflow_run_id"] for t in team.trials] == [copies[t.user_attrs["mlflow_run_id"]]
                                                                     for t in local]
    assert team.user_attrs["mlflow_parent_run_id"] == copies[stores["parent"]]
    assert len(tally(team)[0]) == len(tally(stores["study"])[0]) == len(local)  # what a resumed sweep counts


def test_push_resume_locally_push_again_the_team_study_holds_every_trial(stores, capfd):
    train_locally(stores, 2)
    first = do_push(stores, capfd)
    assert "copied 3 new runs (0 already there), 2 new trials" in first, first
    assert "A new study created" not in first and "[optuna]" not in first, first  # Optuna's own log line
    check_team_holds_every_trial(stores)

    train_locally(stores, 3)  # the sweep resumed on the laptop: three more trials
    second = do_push(stores, capfd)
    check_team_holds_every_trial(stores)
    assert "copied 3 new runs (3 already there), 3 new trials" in second, second

    again = do_push(stores, capfd)
    assert "copied 0 new runs (6 already there), 0 new trials" in again, again
    check_team_holds_every_trial(stores)
    assert optuna.logging.get_verbosity() == logging.INFO  # push left Optuna's level as it was


def test_a_push_stopped_after_the_study_was_created_is_completed_by_the_next(stores, capfd, monkeypatch):
    train_locally(stores, 3)
    added = []

    def add_trial_then_fail(study, trial):
        if added:
            raise OSError("the connection dropped")
        added.append(trial.number)
        real_add_trial(study, trial)

    real_add_trial = optuna.Study.add_trial
    monkeypatch.setattr(optuna.Study, "add_trial", add_trial_then_fail)
    with pytest.raises(UsageError, match="the connection dropped"):
        push.push(stores["team_uri"], stores["team_storage"], None, STUDY, None, None)
    assert len(optuna.load_study(study_name=STUDY, storage=stores["team_storage"]).trials) == 1  # partial
    monkeypatch.setattr(optuna.Study, "add_trial", real_add_trial)
    capfd.readouterr()

    out = do_push(stores, capfd)
    check_team_holds_every_trial(stores)
    assert "copied 0 new runs (4 already there), 2 new trials" in out, out


def test_a_trial_the_team_ran_is_not_mistaken_for_a_pushed_one(stores, capfd):
    """The team resumes the pushed study (its own trial 2), the laptop resumes too (its own trial 2):
    the next push adds the laptop's as a new trial; both are kept."""
    train_locally(stores, 2)
    do_push(stores, capfd)
    team = optuna.load_study(study_name=STUDY, storage=stores["team_storage"])
    team.add_trial(optuna.trial.create_trial(params={"lr": 0.02}, distributions=LR, value=0.4))
    train_locally(stores, 1)
    out = do_push(stores, capfd)
    assert "1 new trial" in out, out
    team = optuna.load_study(study_name=STUDY, storage=stores["team_storage"])
    assert [t.user_attrs.get("pushed.from_trial") for t in team.trials] == [0, 1, None, 2]


def test_a_study_missing_from_the_local_storage_is_one_line(stores, capfd):
    train_locally(stores, 1)
    optuna.delete_study(study_name=STUDY, storage=stores["storage"])
    with pytest.raises(UsageError, match="no study 'moved' in"):
        push.push(stores["team_uri"], stores["team_storage"], None, STUDY, None, None)
