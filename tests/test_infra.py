"""The infra/ files that cannot run here (compose, Kubernetes) parsed and cross-checked against the
repo: images, ports, mounted files, entrypoints, and schedules equal to pipelines.yaml."""

import re
import shlex

import yaml

from conftest import ROOT
from rlhf.config import load_file, load_pipeline

INFRA = ROOT / "infra"
PIPELINES = load_file(ROOT / "pipelines.yaml")


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def kube(name: str) -> list[dict]:
    return list(yaml.safe_load_all((INFRA / "kuberay" / name).read_text()))


def test_compose_services_images_and_ports():
    services = compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-bucket", "prefect-server", "mlflow", "prefect-worker"}
    for name, service in services.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), name  # every image has a tag
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), (name, published)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), (name, source)
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    built = [s for s in services.values() if "build" in s]
    assert {s["image"] for s in built} == {"rlhf-pipeline:latest"}
    for service in built:
        context = (INFRA / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()


def test_compose_services_reach_each_other_where_they_listen():
    services = compose()["services"]
    listening = {"postgres": 5432, "minio": 9000, "prefect-server": 4200, "mlflow": 5000}
    text = yaml.safe_dump(services)
    for host, port in re.findall(r"://(?:[^@/\s]+@)?([a-z-]+):(\d+)", text):
        assert listening.get(host) == int(port), (host, port)
    worker = services["prefect-worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--prefect-file infra/prefect.yaml" in worker["command"][0]
    assert "--pool rlhf-process" in worker["command"][0]


def test_dockerfile_copies_files_that_exist():
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).exists(), source


def test_prefect_yaml_deploys_every_scheduled_pipeline_as_in_pipelines_yaml():
    import flows.pipeline

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    deployed = {d["name"]: d for d in spec["deployments"]}
    scheduled = {name: p for name, p in PIPELINES.pipelines.items() if p.schedule}
    assert set(deployed) == {f"{name}-pool" for name in scheduled}
    for name, pipeline in scheduled.items():
        deployment = deployed[f"{name}-pool"]
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file() and getattr(flows.pipeline, function).name == "rlhf-pipeline"
        assert deployment["parameters"] == {"pipeline": name, "overrides": pipeline.schedule.overrides, "scheduled": True}
        [schedule] = deployment["schedules"]
        assert schedule.get("cron") == pipeline.schedule.cron
        assert schedule.get("interval") == pipeline.schedule.interval
        assert schedule["timezone"] == pipeline.schedule.timezone
        assert deployment["work_pool"]["name"] == "rlhf-process" and deployment["concurrency_limit"] == 1


def test_kuberay_cluster_and_job_fit_each_other_and_the_demo():
    config_map, claim = kube("common.yaml")
    [cluster] = kube("raycluster.yaml")
    [job] = kube("rayjob-pipeline.yaml")
    assert (config_map["kind"], claim["kind"], cluster["kind"], job["kind"]) == ("ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert {"MLFLOW_TRACKING_URI", "RLHF_HOME", "RAY_AUTH_MODE"} <= set(config_map["data"])

    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    pods += [job["spec"]["submitterPodTemplate"]["spec"]]
    for pod in pods:
        for container in pod["containers"]:
            assert container["image"] == "rlhf-pipeline:latest"
            assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
            assert any(e["name"] == "RAY_AUTH_TOKEN" for e in container["env"])
            for mount in container.get("volumeMounts", []):
                assert mount["mountPath"] == config_map["data"]["RLHF_HOME"]
        for volume in pod.get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    _, command, pipeline, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert command == "run" and overrides[::2] == ["--set"] * (len(overrides) // 2)
    _, config = load_pipeline(ROOT / "pipelines.yaml", pipeline, overrides[1::2])
    ray = config.ray
    assert ray.trains_on_ray()  # SFT and reward use the worker group too, not only PPO
    [workers] = cluster["spec"]["workerGroupSpecs"]
    assert workers["replicas"] >= ray.num_workers
    assert workers["rayStartParams"]["num-cpus"] == str(ray.cpus_per_worker)
