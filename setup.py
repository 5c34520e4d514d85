from setuptools import find_packages, setup

setup(
    name='pale_mm',
    version='0.1.0',
    description='Pale Transformer (pale-shaped self-attention), LIT and ScalableViT '
                'backbones for mmdetection, mmsegmentation and timm',
    long_description=open('README.md', encoding='utf-8').read()
    if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['pale_mm', 'pale_mm.*']),
    package_data={'pale_mm': ['ops/csrc/*.cpp']},
    python_requires='>=3.8',
    install_requires=[
        'torch>=2.0',
        'torchvision',
        'mmengine>=0.10,<1.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'mmdet>=3.0,<3.4',
        'mmsegmentation>=1.0,<1.3',
        'timm>=0.9',
        'numpy<2',
        'setuptools>=77,<82',
        'ftfy',
        'regex',
    ],
    extras_require={'tests': ['pytest', 'pytest-xdist'], 'deploy': ['onnx', 'onnxruntime', 'openvino']},
    license='Apache-2.0',
)
