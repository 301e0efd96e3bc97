"""The Flower peer of bench/federated.py: the same head, the same split, the same local optimiser, run by
Flower's own simulation engine (flwr[simulation]==1.42.0, Ray) with its FedAvg strategy. It needs only numpy
and flwr, so it runs in the venv bench/federated.py makes for it (Flower pins another protobuf than onnx's):

    python bench/federated_flower.py SCENARIO.npz ROUNDS OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "edgeops" / "agent"))
from edgeops_agent import head_accuracy, train_head  # noqa: E402  (the agent's own training step: one code)


def main() -> None:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    scenario, rounds, out = np.load(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    settings = json.loads(str(scenario["settings"]))
    features, labels = scenario["features"], scenario["labels"]
    parts = [scenario[f"part{i}"] for i in range(int(settings["devices"]))]
    eval_features, eval_labels = scenario["eval_features"], scenario["eval_labels"]
    curve: list[float] = []

    class HeadClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, index: int) -> None:
            part = parts[index]
            every = int(settings["every"])
            self.train = part[np.arange(len(part)) % every != every - 1]

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            weight, bias = parameters
            w, b = train_head(features[self.train], labels[self.train], weight, bias, settings["epochs"],
                              settings["learning_rate"], settings["batch_size"], 0.0, int(config.get("round", 0)))
            return [w, b], len(self.train), {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return HeadClient(int(context.node_config["partition-id"])).to_client()

    def evaluate(server_round, parameters, config):  # type: ignore[no-untyped-def]
        weight, bias = parameters
        accuracy = float(head_accuracy(eval_features, eval_labels, weight, bias) or 0.0)
        if server_round > 0:
            curve.append(round(accuracy, 2))
        return 0.0, {"accuracy": accuracy}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(parts),
                      min_available_clients=len(parts), evaluate_fn=evaluate,
                      on_fit_config_fn=lambda r: {"round": r},
                      initial_parameters=ndarrays_to_parameters([scenario["weight"], scenario["bias"]]))

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    started = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(parts), backend_config={"client_resources": {"num_cpus": 1}})
    out.write_text(json.dumps({"flwr": __import__("flwr").__version__, "accuracy": curve,
                               "tensor_bytes": int(scenario["weight"].nbytes + scenario["bias"].nbytes),
                               "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
