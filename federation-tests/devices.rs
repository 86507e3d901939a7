//! `GET /user/devices/{userId}`: a local user's devices, for another server.

use serde_json::json;

use crate::{
    graph::{get_as, two_servers},
    harness::{Backend, enc},
    testnet::TestNet,
};

crate::backend_tests!(user_devices_lists_a_local_users_devices_to_another_server);

async fn user_devices_lists_a_local_users_devices_to_another_server(backend: Backend) {
    let net = TestNet::new().await;
    let (a, b) = two_servers(&net, backend).await;
    let alice = a.server.register("alice").await;
    let phone = a.server.login_device(&alice, "PHONE").await;
    let path = format!("/_matrix/client/v3/devices/{}", phone.device_id);
    let (status, body) = a.server.put(&path, Some(&phone.access_token), json!({"display_name": "Phone"})).await;
    assert_eq!(status, 200, "{body}");

    let uri = format!("/_matrix/federation/v1/user/devices/{}", enc(&alice.user_id));
    let (status, body) = get_as(&net, &a, &b, &uri).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], json!(alice.user_id));
    assert!(body["stream_id"].as_u64().is_some(), "{body}");
    let devices = body["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{body}");
    let phone_entry = devices.iter().find(|d| d["device_id"] == json!(phone.device_id)).expect("the phone");
    assert_eq!(phone_entry["device_display_name"], "Phone");
    assert_eq!(phone_entry["keys"]["device_id"], json!(phone.device_id));

    for user in ["@nobody:a.test", "@alice:b.test"] {
        let uri = format!("/_matrix/federation/v1/user/devices/{}", enc(user));
        let (status, body) = get_as(&net, &a, &b, &uri).await;
        assert_eq!((status, &body["errcode"]), (404, &json!("M_NOT_FOUND")), "{user}: {body}");
    }
}
