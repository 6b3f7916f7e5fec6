//! Smoke tests proving the S3 server and the KMS emulator are the real thing, through the
//! official AWS SDK for Rust.

use std::collections::HashMap;

use anyhow::{Result, bail};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_sdk_s3::primitives::ByteStream;

fn context(care_system: &str) -> HashMap<String, String> {
    HashMap::from([
        ("care-system".to_string(), care_system.to_string()),
        ("purpose".to_string(), "tenant-root-key".to_string()),
    ])
}

#[tokio::test]
async fn s3_conditional_writes_are_enforced() -> Result<()> {
    let server = shcr_testenv::s3().await?;
    let s3 = server.client().await;
    let bucket = shcr_testenv::unique_name("cond");
    server.create_bucket(&s3, &bucket).await?;

    let first = s3
        .put_object()
        .bucket(&bucket)
        .key("manifest/00001")
        .body(ByteStream::from_static(b"one"))
        .if_none_match("*")
        .send()
        .await?;
    let etag = first.e_tag().unwrap_or_default().to_string();

    let second = s3
        .put_object()
        .bucket(&bucket)
        .key("manifest/00001")
        .body(ByteStream::from_static(b"two"))
        .if_none_match("*")
        .send()
        .await;
    match second {
        Err(e) => assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(412)),
        Ok(_) => bail!("a second If-None-Match: * put was accepted"),
    }

    let wrong = s3
        .put_object()
        .bucket(&bucket)
        .key("manifest/00001")
        .body(ByteStream::from_static(b"three"))
        .if_match("\"0000000000000000\"")
        .send()
        .await;
    match wrong {
        Err(e) => assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(412)),
        Ok(_) => bail!("a put with a stale If-Match was accepted"),
    }

    s3.put_object()
        .bucket(&bucket)
        .key("manifest/00001")
        .body(ByteStream::from_static(b"four"))
        .if_match(etag)
        .send()
        .await?;
    let body = s3
        .get_object()
        .bucket(&bucket)
        .key("manifest/00001")
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    assert_eq!(&body[..], b"four");
    Ok(())
}

#[tokio::test]
async fn kms_keys_have_real_states_and_contexts() -> Result<()> {
    let kms = shcr_testenv::kms().await?.client().await;
    let key = kms
        .create_key()
        .description("shcr smoke test key")
        .send()
        .await?
        .key_metadata
        .map(|m| m.key_id)
        .unwrap_or_default();
    let alias = format!("alias/shcr/{}", shcr_testenv::unique_name("smoke"));
    kms.create_alias()
        .alias_name(&alias)
        .target_key_id(&key)
        .send()
        .await?;
    kms.enable_key_rotation().key_id(&key).send().await?;
    let rotation = kms.get_key_rotation_status().key_id(&key).send().await?;
    assert!(rotation.key_rotation_enabled());

    let data_key = kms
        .generate_data_key()
        .key_id(&alias)
        .key_spec(DataKeySpec::Aes256)
        .set_encryption_context(Some(context("north-east")))
        .send()
        .await?;
    let wrapped = data_key
        .ciphertext_blob
        .clone()
        .unwrap_or_else(|| Blob::new(vec![]));
    let plaintext = data_key
        .plaintext
        .clone()
        .unwrap_or_else(|| Blob::new(vec![]));
    assert_eq!(plaintext.as_ref().len(), 32);

    let unwrapped = kms
        .decrypt()
        .ciphertext_blob(wrapped.clone())
        .set_encryption_context(Some(context("north-east")))
        .send()
        .await?;
    assert_eq!(
        unwrapped.plaintext.map(|b| b.into_inner()),
        Some(plaintext.into_inner())
    );

    let wrong_context = kms
        .decrypt()
        .ciphertext_blob(wrapped.clone())
        .set_encryption_context(Some(context("south-west")))
        .send()
        .await;
    assert!(
        wrong_context.is_err(),
        "decrypt with the wrong context succeeded"
    );

    kms.disable_key().key_id(&key).send().await?;
    let while_disabled = kms
        .decrypt()
        .ciphertext_blob(wrapped.clone())
        .set_encryption_context(Some(context("north-east")))
        .send()
        .await;
    match while_disabled {
        Err(e) => {
            // AWS answers DisabledException; local-kms answers AccessDeniedException. Either
            // way the key state, not the context or the ciphertext, refused the decrypt.
            let service = e.into_service_error();
            let code = aws_sdk_kms::error::ProvideErrorMetadata::code(&service);
            assert!(
                matches!(code, Some("DisabledException" | "AccessDeniedException")),
                "unexpected error: {service:?}"
            );
        }
        Ok(_) => bail!("decrypt with a disabled key succeeded"),
    }
    kms.enable_key().key_id(&key).send().await?;
    kms.decrypt()
        .ciphertext_blob(wrapped)
        .set_encryption_context(Some(context("north-east")))
        .send()
        .await?;

    let deletion = kms
        .schedule_key_deletion()
        .key_id(&key)
        .pending_window_in_days(7)
        .send()
        .await?;
    assert!(deletion.deletion_date.is_some());
    let state = kms
        .describe_key()
        .key_id(&key)
        .send()
        .await?
        .key_metadata
        .and_then(|m| m.key_state);
    assert_eq!(state, Some(aws_sdk_kms::types::KeyState::PendingDeletion));
    Ok(())
}
