//! Thumbnails, with the `image` crate: JPEG, PNG, WebP and GIF in; JPEG (for JPEG sources), PNG
//! (for the rest, which may be transparent) or, for an animated thumbnail, GIF out.
//!
//! An image's dimensions are read from its header before anything is decoded, and one with more
//! pixels than the configured limit is refused: a small file that decodes to gigabytes (a
//! decompression bomb) costs nothing. Everything here is CPU-bound and runs on a blocking thread.

use std::io::Cursor;

use image::{
    AnimationDecoder, DynamicImage, ImageFormat, ImageReader, Limits,
    codecs::{
        gif::{GifDecoder, GifEncoder, Repeat},
        jpeg::JpegEncoder,
        webp::WebPDecoder,
    },
    imageops::FilterType,
};

/// Sizes made when an image is uploaded (Synapse's defaults, which clients expect), and the
/// sizes any request is rounded up to, so a client cannot make the server store thumbnails of
/// every size it names.
pub const SIZES: [(u32, u32, Method); 5] = [
    (32, 32, Method::Crop),
    (96, 96, Method::Crop),
    (320, 240, Method::Scale),
    (640, 480, Method::Scale),
    (800, 600, Method::Scale),
];
/// Frames of an animated thumbnail at most (the rest of the animation is left out).
const MAX_FRAMES: usize = 150;
const JPEG_QUALITY: u8 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Fill the box exactly, cutting off what does not fit.
    Crop,
    /// Fit inside the box, keeping the aspect ratio.
    Scale,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }

    pub fn parse(text: &str) -> Option<Method> {
        match text {
            "crop" => Some(Method::Crop),
            "scale" => Some(Method::Scale),
            _ => None,
        }
    }
}

/// The stored size a request for `width`×`height` is served from: the smallest of [`SIZES`]
/// that covers it, else the largest.
pub fn round_up(width: u32, height: u32) -> (u32, u32) {
    SIZES
        .iter()
        .map(|(w, h, _)| (*w, *h))
        .find(|(w, h)| *w >= width && *h >= height)
        .unwrap_or((SIZES[SIZES.len() - 1].0, SIZES[SIZES.len() - 1].1))
}

#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    /// Not an image format this server thumbnails (or not an image at all).
    #[error("not an image that can be thumbnailed")]
    Unsupported,
    #[error("the image has {0} pixels, more than this server thumbnails")]
    TooManyPixels(u64),
    #[error("the image could not be decoded: {0}")]
    Broken(String),
}

/// An image's format and size, read from its header alone.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ThumbnailError> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| ThumbnailError::Unsupported)?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif) => Ok(reader),
        _ => Err(ThumbnailError::Unsupported),
    }
}

/// The format (from the content, not the declared type) and dimensions, refusing images over
/// `max_pixels`.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<Probe, ThumbnailError> {
    let reader = reader(bytes)?;
    let format = reader.format().ok_or(ThumbnailError::Unsupported)?;
    let (width, height) = reader.into_dimensions().map_err(|err| ThumbnailError::Broken(err.to_string()))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ThumbnailError::TooManyPixels(pixels));
    }
    if pixels == 0 {
        return Err(ThumbnailError::Broken("the image has no pixels".to_owned()));
    }
    Ok(Probe { format, width, height })
}

/// A generated thumbnail.
#[derive(Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// A thumbnail of `bytes` in the box `width`×`height` by `method`; with `animated`, of every
/// frame of an animated GIF or WebP (a still image gives a still thumbnail).
pub fn generate(
    bytes: &[u8],
    width: u32,
    height: u32,
    method: Method,
    animated: bool,
    max_pixels: u64,
) -> Result<Thumbnail, ThumbnailError> {
    let probe = probe(bytes, max_pixels)?;
    if animated && let Some(thumbnail) = animated_thumbnail(bytes, probe, width, height, method)? {
        return Ok(thumbnail);
    }
    let mut reader = reader(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(probe.width);
    limits.max_image_height = Some(probe.height);
    reader.limits(limits);
    let image = reader.decode().map_err(|err| ThumbnailError::Broken(err.to_string()))?;
    let resized = resize(&image, width, height, method);
    let mut out = Vec::new();
    let content_type = if probe.format == ImageFormat::Jpeg {
        JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
            .encode_image(&resized.to_rgb8())
            .map_err(|err| ThumbnailError::Broken(err.to_string()))?;
        "image/jpeg"
    } else {
        resized
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .map_err(|err| ThumbnailError::Broken(err.to_string()))?;
        "image/png"
    };
    Ok(Thumbnail { bytes: out, content_type, width: resized.width(), height: resized.height() })
}

/// The size of `source` resized into the box: never larger than the source.
fn target_size(source: (u32, u32), width: u32, height: u32, method: Method) -> (u32, u32) {
    let (sw, sh) = (f64::from(source.0), f64::from(source.1));
    let ratio = match method {
        // Crop: the box filled, so the larger ratio.
        Method::Crop => (f64::from(width) / sw).max(f64::from(height) / sh),
        Method::Scale => (f64::from(width) / sw).min(f64::from(height) / sh),
    }
    .min(1.0);
    let scaled = (((sw * ratio).round() as u32).max(1), ((sh * ratio).round() as u32).max(1));
    match method {
        Method::Crop => (scaled.0.min(width), scaled.1.min(height)),
        Method::Scale => scaled,
    }
}

fn resize(image: &DynamicImage, width: u32, height: u32, method: Method) -> DynamicImage {
    let (w, h) = target_size((image.width(), image.height()), width, height, method);
    if (w, h) == (image.width(), image.height()) {
        return image.clone();
    }
    match method {
        Method::Crop => image.resize_to_fill(w, h, FilterType::Triangle),
        Method::Scale => image.resize_exact(w, h, FilterType::Triangle),
    }
}

/// An animated GIF thumbnail of an animated GIF or WebP; `None` for a still image.
fn animated_thumbnail(
    bytes: &[u8],
    probe: Probe,
    width: u32,
    height: u32,
    method: Method,
) -> Result<Option<Thumbnail>, ThumbnailError> {
    let broken = |err: image::ImageError| ThumbnailError::Broken(err.to_string());
    let frames: Vec<image::Frame> = match probe.format {
        ImageFormat::Gif => {
            let decoder = GifDecoder::new(Cursor::new(bytes)).map_err(broken)?;
            decoder.into_frames().take(MAX_FRAMES).collect::<Result<_, _>>().map_err(broken)?
        }
        ImageFormat::WebP => {
            let decoder = WebPDecoder::new(Cursor::new(bytes)).map_err(broken)?;
            if !decoder.has_animation() {
                return Ok(None);
            }
            decoder.into_frames().take(MAX_FRAMES).collect::<Result<_, _>>().map_err(broken)?
        }
        _ => return Ok(None),
    };
    if frames.len() < 2 {
        return Ok(None);
    }
    let (w, h) = target_size((probe.width, probe.height), width, height, method);
    let resized = frames.into_iter().map(|frame| {
        let delay = frame.delay();
        let image = DynamicImage::ImageRgba8(frame.into_buffer());
        let small = match method {
            Method::Crop => image.resize_to_fill(w, h, FilterType::Triangle),
            Method::Scale => image.resize_exact(w, h, FilterType::Triangle),
        };
        image::Frame::from_parts(small.to_rgba8(), 0, 0, delay)
    });
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        encoder.set_repeat(Repeat::Infinite).map_err(broken)?;
        encoder.encode_frames(resized).map_err(broken)?;
    }
    Ok(Some(Thumbnail { bytes: out, content_type: "image/gif", width: w, height: h }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image =
            DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(width, height, image::Rgba([9, 99, 199, 255])));
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn requests_round_up_to_a_stored_size() {
        assert_eq!(round_up(1, 1), (32, 32));
        assert_eq!(round_up(33, 10), (96, 96));
        assert_eq!(round_up(300, 240), (320, 240));
        assert_eq!(round_up(4000, 4000), (800, 600));
    }

    #[test]
    fn scale_keeps_the_aspect_ratio_and_never_enlarges() {
        assert_eq!(target_size((1600, 800), 320, 240, Method::Scale), (320, 160));
        assert_eq!(target_size((100, 50), 320, 240, Method::Scale), (100, 50));
        assert_eq!(target_size((1600, 800), 96, 96, Method::Crop), (96, 96));
        assert_eq!(target_size((40, 20), 96, 96, Method::Crop), (40, 20));
    }

    #[test]
    fn a_png_gets_a_png_thumbnail_of_the_asked_box() {
        let thumb = generate(&png(1000, 500), 320, 240, Method::Scale, false, 1_000_000).unwrap();
        assert_eq!(thumb.content_type, "image/png");
        assert_eq!((thumb.width, thumb.height), (320, 160));
        let decoded = image::load_from_memory(&thumb.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 160));
    }

    #[test]
    fn too_many_pixels_are_refused_before_decoding() {
        let err = generate(&png(200, 200), 32, 32, Method::Crop, false, 39_999).unwrap_err();
        assert!(matches!(err, ThumbnailError::TooManyPixels(40_000)), "{err}");
    }

    #[test]
    fn what_is_not_an_image_is_unsupported() {
        let err = generate(b"<svg xmlns='http://www.w3.org/2000/svg'/>", 32, 32, Method::Crop, false, 100).unwrap_err();
        assert!(matches!(err, ThumbnailError::Unsupported), "{err}");
    }
}
