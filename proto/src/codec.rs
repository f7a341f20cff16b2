//! The codec every niix.v1 service and client uses: prost encoding, with a
//! request that does not parse reported as INVALID_ARGUMENT.
//!
//! tonic's stock prost codec answers a message that is not valid protobuf
//! (a truncated field, a string that is not UTF-8, a wrong wire type) with
//! INTERNAL, which tells the sender the fault is the server's. The fault is
//! the sender's, and the sender is the one who can fix it, so niix says so.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// `application/grpc+proto` through prost; decode failures are INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct NiixCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for NiixCodec<T, U> {
    fn default() -> Self {
        NiixCodec { _types: PhantomData }
    }
}

impl<T, U> Codec for NiixCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// A prost decoder whose parse errors name the message type and say what to fix.
#[derive(Debug)]
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or("message");
            Status::invalid_argument(format!(
                "the {name} message is not valid protobuf for niix.v1 ({}); \
                 check that it was encoded from the published .proto files and that every string is UTF-8",
                s.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
