//! The inference stream's frames: any bytes read as frames and their JSON
//! heads and requests, or an error; never a panic or an allocation the
//! length prefix alone asked for.

#![no_main]

use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use ollamacron_gateway::frame::{InferHead, InferRequest, InferRequestHead, decode, read_frame};

/// Most frames read from one input.
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    futures::executor::block_on(async {
        let mut io = Cursor::new(data);
        for _ in 0..MAX_FRAMES {
            let Ok((_, payload)) = read_frame(&mut io).await else {
                break;
            };
            let _ = decode::<InferRequestHead>("request head", &payload);
            let _ = decode::<InferRequest>("request", &payload);
            let _ = decode::<InferHead>("head", &payload);
        }
    });
});
