//! `GET`/`POST /publicRooms` over federation: our public room list, paged and searchable, for
//! another server.

use serde_json::json;

use crate::{
    graph::{get_as, two_servers},
    harness::Backend,
    testnet::{TestNet, json as body_of, x_matrix},
};

crate::backend_tests!(public_rooms_are_listed_to_another_server);

async fn public_rooms_are_listed_to_another_server(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let lounge = a.server.create_room(&alice, json!({"visibility": "public", "name": "Lounge"})).await;
    let garden = a.server.create_room(&alice, json!({"visibility": "public", "name": "Garden"})).await;
    a.server.create_room(&alice, json!({"name": "Hidden"})).await;

    let (status, body) = get_as(&net, &a, &b, "/_matrix/federation/v1/publicRooms").await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<&str> = body["chunk"].as_array().unwrap().iter().filter_map(|r| r["room_id"].as_str()).collect();
    ids.sort();
    let mut wanted = vec![lounge.as_str(), garden.as_str()];
    wanted.sort();
    assert_eq!(ids, wanted, "only the published rooms: {body}");

    let (status, page) = get_as(&net, &a, &b, "/_matrix/federation/v1/publicRooms?limit=1").await;
    assert_eq!((status, page["chunk"].as_array().map(Vec::len)), (200, Some(1)), "{page}");
    assert!(page["next_batch"].is_string(), "{page}");

    let uri = "/_matrix/federation/v1/publicRooms";
    let filter = json!({"filter": {"generic_search_term": "garden"}});
    let (client, base) = net.client_for(&a);
    let authorization = x_matrix(&b.signing_key(), &b.name, &a.name, "POST", uri, Some(&filter));
    let request = client.post(format!("{base}{uri}")).header("authorization", authorization).json(&filter);
    let (status, body) = body_of(request.send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["chunk"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["chunk"][0]["room_id"], json!(garden));
}
