//! Serving over TCP: kube clients from a kubeconfig, extra routes, `run`.
use super::*;

async fn kube_client_from(kubeconfig: &std::path::Path) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig parses");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kube-rs accepts the kubeconfig");
    Client::try_from(config).expect("client from kubeconfig")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_kube_clients_and_extra_routes() {
    let server = ApiServer::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let extra = axum::Router::new().route(
        "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/restart",
        axum::routing::put(|| async { "restarted" }),
    );
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, extra).await });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    guestcred_lab::apiserver::write_kubeconfig(&kubeconfig, &url).unwrap();

    let client = kube_client_from(&kubeconfig).await;
    assert_eq!(client.default_namespace(), "default");
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    create(&secrets, &secret("s", "x")).await;
    let seen_in_process: Api<Secret> = Api::default_namespaced(server.client());
    assert!(!gone(&seen_in_process, "s").await);

    let req = http::Request::put(
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/vm/restart",
    )
    .body(Vec::new())
    .unwrap();
    let body = client.request_text(req).await.unwrap();
    assert_eq!(body, "restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_on_the_bound_port_and_writes_a_kubeconfig() {
    use guestcred_lab::apiserver::{ApiServerArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("lab").join("kubeconfig");
    let args = ApiServerArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        kubeconfig: Some(kubeconfig.clone()),
    };
    let task = tokio::spawn(run(args));
    let written = tokio::time::timeout(STEP, async {
        while !kubeconfig.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(written.is_ok(), "run writes the kubeconfig once it listens");
    let client = kube_client_from(&kubeconfig).await;
    let namespaces: Api<Namespace> = Api::all(client);
    assert_eq!(
        listed_names(&namespaces).await,
        ["default", "kube-public", "kube-system"]
    );
    task.abort();
}
