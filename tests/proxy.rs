mod common;

use common::*;

#[tokio::test]
async fn round_robin_is_exact() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gw = Gangway::start(&catch_all(&[&ups[0], &ups[1], &ups[2]], "")).await;
    let mut client = Client::connect(gw.addr).await;
    for _ in 0..301 {
        let got = client.get("app.test", "/").await;
        assert_eq!(got.status, 200);
    }
    let mut hits: Vec<usize> = ups.iter().map(|u| u.hits()).collect();
    hits.sort();
    assert_eq!(hits, vec![100, 100, 101]);
}
